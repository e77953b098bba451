/* Elementwise dst += src for the dtypes rdmakv sums.  Integers wrap like
 * numpy's (added as unsigned to avoid signed-overflow UB); float16 uses the
 * compiler's _Float16, which rounds each sum once, as numpy does. */
#ifndef RDMAKV_REDUCE_H
#define RDMAKV_REDUCE_H
#include <stddef.h>
#include <stdint.h>

#define RDMAKV_DEFINE_ADD(NAME, T, ACC)                                      \
    static inline void NAME(void *dst, const void *src, size_t count) {     \
        T *restrict d = (T *)dst;                                           \
        const T *restrict s = (const T *)src;                               \
        for (size_t i = 0; i < count; i++) d[i] = (T)((ACC)d[i] + (ACC)s[i]); \
    }

RDMAKV_DEFINE_ADD(rdmakv_add_f32, float, float)
RDMAKV_DEFINE_ADD(rdmakv_add_f64, double, double)
RDMAKV_DEFINE_ADD(rdmakv_add_i8, int8_t, uint8_t)
RDMAKV_DEFINE_ADD(rdmakv_add_u8, uint8_t, uint8_t)
RDMAKV_DEFINE_ADD(rdmakv_add_i32, int32_t, uint32_t)
RDMAKV_DEFINE_ADD(rdmakv_add_i64, int64_t, uint64_t)
RDMAKV_DEFINE_ADD(rdmakv_add_f16, _Float16, float)

#endif
