/* BytePS's gradient compressors as pure float32 codecs: onebit, top-k,
 * random-k and dithering.  No state beyond what the caller passes (the rng
 * word); the framework (codec.h) adds error feedback and momentum around them.
 *
 * Each codec has
 *   rk_X_max_bytes(count, ...)            the most bytes an encoding takes
 *   rk_X_encode(src, count, ..., dst)     the bytes written (dst holds max_bytes)
 *   rk_X_decode_add(src, bytes, dst, count, ...)
 *                                         dst[i] += decoded[i]; 0, or -1 when
 *                                         src is not an encoding of count values
 *                                         with these parameters (nothing added).
 * Decoders trust nothing in src: a wrong length, an index out of range or out of
 * order, a code above the levels, a non-canonical padding bit, a negative scale or
 * norm is refused before dst is touched.  A NaN or +inf scale is not: it is what a
 * tensor holding an inf or a NaN encodes to (onebit's values decode to +-inf or
 * NaN, every dithering value to NaN), so such a gradient poisons the sum as it
 * would uncompressed, and a peer could push NaNs uncompressed anyway.
 *
 * Wire formats (host byte order, like every payload rdmakv moves; no alignment):
 *   onebit     f32 scale | ceil(count/8) bytes of signs, bit i%8 of byte i/8 set
 *              when src[i] < 0, padding bits zero.  Decoded: -scale or +scale.
 *              scale = mean |src| (scaled) or 1.  Exactly 4 + ceil(count/8) bytes.
 *   topk,      n = min(k, count) u32 indices, strictly ascending, < count |
 *   randomk    n f32 values, exactly as in src.  Exactly 8n bytes.
 *              topk keeps the n largest |src| (a NaN above all; ties: lower index);
 *              randomk n distinct indices drawn uniformly (selection sampling).
 *   dithering  f32 norm | count codes of w = 1 + bit_width(levels) bits, packed
 *              from bit 0 of the first byte up, padding bits zero.  A code is
 *              (m << 1) | sign with m in [0, levels] (sign 0 when m is 0).
 *              linear:  decoded = m * norm / levels
 *              natural: decoded = 2^(m-1) * norm / 2^(levels-1)  (0 when m is 0)
 *              norm = max |src| (RK_DITHER_MAX) or the l2 norm (RK_DITHER_L2).
 *              Codes are packed 8 at a time, little end first: 8 codes fill w bytes.
 *              Exactly 4 + ceil(count * w / 8) bytes.
 *
 * Randomness: splitmix64 over the caller's one-word state (*rng).  Its outputs
 * are a function of a counter (state + i * golden gamma), so a loop draws them
 * independently per element (vectorizable), any seed (0 too) is valid, and
 * tests replay the same stream in numpy from the seed.
 *
 * Counts are at most RK_CODEC_MAX_COUNT (indices are u32); max_bytes returns 0
 * above it, or for parameters out of range, and encoders must not be called then. */
#ifndef RDMAKV_CODECS_BYTEPS_H
#define RDMAKV_CODECS_BYTEPS_H
#include <stddef.h>
#include <stdint.h>

#define RK_CODEC_MAX_COUNT ((size_t)UINT32_MAX)
#define RK_DITHER_LINEAR 0
#define RK_DITHER_NATURAL 1
#define RK_DITHER_MAX 0
#define RK_DITHER_L2 1
/* Levels: linear 1..32767 (codes of at most 16 bits); natural 1..31 (2^30 is the top level). */
#define RK_DITHER_MAX_LINEAR_LEVELS 32767u
#define RK_DITHER_MAX_NATURAL_LEVELS 31u

/* splitmix64: the next 64 random bits, advancing *state by one. */
uint64_t rk_rng_next(uint64_t *state);

size_t rk_onebit_max_bytes(size_t count);
size_t rk_onebit_encode(const float *src, size_t count, int scaled, void *dst);
int rk_onebit_decode_add(const void *src, size_t bytes, float *dst, size_t count);

size_t rk_topk_max_bytes(size_t count, uint32_t k);
size_t rk_topk_encode(const float *src, size_t count, uint32_t k, void *dst);
int rk_topk_decode_add(const void *src, size_t bytes, float *dst, size_t count, uint32_t k);

size_t rk_randomk_max_bytes(size_t count, uint32_t k);
size_t rk_randomk_encode(const float *src, size_t count, uint32_t k, uint64_t *rng, void *dst);
int rk_randomk_decode_add(const void *src, size_t bytes, float *dst, size_t count, uint32_t k);

size_t rk_dithering_max_bytes(size_t count, uint32_t levels, int partition);
size_t rk_dithering_encode(const float *src, size_t count, uint32_t levels, int partition, int normalize,
                           uint64_t *rng, void *dst);
int rk_dithering_decode_add(const void *src, size_t bytes, float *dst, size_t count, uint32_t levels,
                            int partition);

#endif
