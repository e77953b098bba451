/* BytePS's compressors (onebit, top-k, random-k, dithering) for float32:
 * formats and contracts in codecs_byteps.h.  Wire words are read and written
 * with memcpy: an encoding sits at any offset of a frame. */
#include "codecs_byteps.h"

#include <math.h>
#include <string.h>

#define SPLITMIX_GAMMA 0x9e3779b97f4a7c15ULL

static inline uint64_t splitmix_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t rk_rng_next(uint64_t *state) {
    *state += SPLITMIX_GAMMA;
    return splitmix_mix(*state);
}

/* A uniform float in [0, 1) from the top 24 bits: every value is exact. */
static inline float unit_float(uint64_t bits) { return (float)(bits >> 40) * 0x1p-24f; }

static inline float load_f32(const unsigned char *p) {
    float v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline uint32_t load_u32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void store_f32(unsigned char *p, float v) { memcpy(p, &v, sizeof v); }
static inline void store_u32(unsigned char *p, uint32_t v) { memcpy(p, &v, sizeof v); }

/* -v where negative, else v: a flip of the sign bit, which is what negation is, without
 * a branch on a sign that is noise. */
static inline float with_sign(float v, uint32_t negative) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits ^= negative << 31;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* A scale or norm an encoder can write: not negative (nor -0), or NaN (of either
 * sign: x86 makes NaNs negative), or +inf from a tensor holding such values. */
static inline int scale_ok(float scale) { return isnan(scale) || !signbit(scale); }

/* Sum of |src[i]| (squares: of src[i]^2) in double, in 8 lanes (lane i % 8, each
 * summed in order, then the lanes in order): the loop vectorizes, and the result
 * is defined to the bit for tests to reproduce. */
#define SUM_LANES 8

static double lane_sum(const float *src, size_t count, int squares) {
    double lane[SUM_LANES] = {0};
    size_t whole = count - count % SUM_LANES;
    for (size_t i = 0; i < whole; i += SUM_LANES)
        for (unsigned j = 0; j < SUM_LANES; j++) {
            double v = src[i + j];
            lane[j] += squares ? v * v : fabs(v);
        }
    for (size_t i = whole; i < count; i++) {
        double v = src[i];
        lane[i - whole] += squares ? v * v : fabs(v);
    }
    double total = 0.0;
    for (unsigned j = 0; j < SUM_LANES; j++) total += lane[j];
    return total;
}

/* ---- onebit ---- */

size_t rk_onebit_max_bytes(size_t count) {
    return count > RK_CODEC_MAX_COUNT ? 0 : sizeof(float) + (count + 7) / 8;
}

size_t rk_onebit_encode(const float *src, size_t count, int scaled, void *dst) {
    unsigned char *out = dst;
    float scale = 1.0f;
    if (scaled) {
        scale = count ? (float)(lane_sum(src, count, 0) / (double)count) : 0.0f;
    }
    store_f32(out, scale);
    unsigned char *signs = out + sizeof(float);
    size_t whole = count / 8;
    for (size_t j = 0; j < whole; j++) {
        const float *x = src + 8 * j;
        unsigned bits = 0;
        for (unsigned t = 0; t < 8; t++) bits |= (unsigned)(x[t] < 0.0f) << t;
        signs[j] = (unsigned char)bits;
    }
    if (count % 8) {
        unsigned bits = 0;
        for (size_t t = 0; t < count % 8; t++) bits |= (unsigned)(src[8 * whole + t] < 0.0f) << t;
        signs[whole] = (unsigned char)bits;
    }
    return rk_onebit_max_bytes(count);
}

int rk_onebit_decode_add(const void *src, size_t bytes, float *dst, size_t count) {
    const unsigned char *in = src;
    if (count > RK_CODEC_MAX_COUNT || bytes != rk_onebit_max_bytes(count)) return -1;
    float scale = load_f32(in);
    if (!scale_ok(scale)) return -1;
    const unsigned char *signs = in + sizeof(float);
    size_t whole = count / 8;
    if (count % 8 && signs[whole] >> (count % 8)) return -1;     /* padding bits set */
    for (size_t j = 0; j < whole; j++) {
        unsigned bits = signs[j];
        float *d = dst + 8 * j;
        for (unsigned t = 0; t < 8; t++) d[t] += (bits >> t) & 1u ? -scale : scale;
    }
    for (size_t t = 0; t < count % 8; t++) dst[8 * whole + t] += (signs[whole] >> t) & 1u ? -scale : scale;
    return 0;
}

/* ---- top-k and random-k: n ascending u32 indices, then their n f32 values ---- */

static size_t sparse_kept(size_t count, uint32_t k) { return count < k ? count : k; }

/* k may be 0 only for an empty chunk (nothing to keep): its encoding is empty. */
static int sparse_params_ok(size_t count, uint32_t k) { return count <= RK_CODEC_MAX_COUNT && (k > 0 || count == 0); }

static size_t sparse_max_bytes(size_t count, uint32_t k) {
    if (!sparse_params_ok(count, k)) return 0;
    return sparse_kept(count, k) * (sizeof(uint32_t) + sizeof(float));
}

size_t rk_topk_max_bytes(size_t count, uint32_t k) { return sparse_max_bytes(count, k); }
size_t rk_randomk_max_bytes(size_t count, uint32_t k) { return sparse_max_bytes(count, k); }

static int sparse_decode_add(const void *src, size_t bytes, float *dst, size_t count, uint32_t k) {
    const unsigned char *in = src;
    size_t n = sparse_kept(count, k);
    if (!sparse_params_ok(count, k) || bytes != n * (sizeof(uint32_t) + sizeof(float))) return -1;
    const unsigned char *values = in + n * sizeof(uint32_t);
    uint64_t next_allowed = 0;          /* strictly ascending: each index at least one past the last */
    for (size_t i = 0; i < n; i++) {
        uint32_t index = load_u32(in + i * sizeof(uint32_t));
        if (index < next_allowed || index >= count) return -1;
        next_allowed = (uint64_t)index + 1;
    }
    for (size_t i = 0; i < n; i++)
        dst[load_u32(in + i * sizeof(uint32_t))] += load_f32(values + i * sizeof(float));
    return 0;
}

int rk_topk_decode_add(const void *src, size_t bytes, float *dst, size_t count, uint32_t k) {
    return sparse_decode_add(src, bytes, dst, count, k);
}
int rk_randomk_decode_add(const void *src, size_t bytes, float *dst, size_t count, uint32_t k) {
    return sparse_decode_add(src, bytes, dst, count, k);
}

/* |v| as an order: the bits of a float without its sign order as its magnitude,
 * and a NaN above +inf, so a NaN is kept (and reaches the sum) rather than hidden. */
static inline uint32_t magnitude_order(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return bits & 0x7fffffffu;
}

/* Top-k by radix selection on the 31-bit magnitude orders: three counting
 * passes (bits 30-20, 19-9, 8-0) find the n-th largest order T and how many of
 * the values equal to T are kept; a last pass writes, in index order, every
 * value above T and the first of those equal to it (ties keep the lower index).
 * Linear in count, no sort, and the output is already ascending. */
static const unsigned TOPK_SHIFT[3] = {20, 9, 0};
static const unsigned TOPK_BITS[3] = {11, 11, 9};

size_t rk_topk_encode(const float *src, size_t count, uint32_t k, void *dst) {
    size_t n = sparse_kept(count, k);
    if (sparse_max_bytes(count, k) == 0) return 0;
    uint32_t prefix = 0, prefix_mask = 0;
    size_t wanted = n;                 /* of the values matching prefix, how many from the top */
    for (unsigned pass = 0; pass < 3 && n; pass++) {
        uint32_t buckets[1u << 11] = {0};
        const unsigned shift = TOPK_SHIFT[pass];
        const uint32_t digit = (1u << TOPK_BITS[pass]) - 1;
        for (size_t i = 0; i < count; i++) {
            uint32_t order = magnitude_order(src[i]);
            buckets[(order >> shift) & digit] += (order & prefix_mask) == prefix;
        }
        uint32_t bucket = digit;
        while (buckets[bucket] < wanted) wanted -= buckets[bucket--];     /* some bucket holds the n-th */
        prefix |= bucket << shift;
        prefix_mask |= digit << shift;
    }
    unsigned char *idx = dst, *val = (unsigned char *)dst + n * sizeof(uint32_t);
    size_t taken = 0, ties = wanted;
    for (size_t i = 0; i < count && taken < n; i++) {
        uint32_t order = magnitude_order(src[i]);
        int keep = order > prefix || (order == prefix && ties > 0);
        if (!keep) continue;
        ties -= order == prefix;
        store_u32(idx + taken * 4, (uint32_t)i);
        store_f32(val + taken * 4, src[i]);
        taken++;
    }
    return n * (sizeof(uint32_t) + sizeof(float));
}

/* Selection sampling (Knuth's algorithm S): element i is taken with probability
 * needed / remaining, which yields exactly n distinct indices, uniformly, already
 * ascending.  The draw maps 64 random bits onto [0, remaining) by a multiply. */
size_t rk_randomk_encode(const float *src, size_t count, uint32_t k, uint64_t *rng, void *dst) {
    size_t n = sparse_kept(count, k);
    if (sparse_max_bytes(count, k) == 0) return 0;
    unsigned char *idx = dst, *val = (unsigned char *)dst + n * sizeof(uint32_t);
    size_t taken = 0;
    for (size_t i = 0; i < count && taken < n; i++) {
        uint64_t remaining = count - i;
        if ((uint64_t)(((unsigned __int128)rk_rng_next(rng) * remaining) >> 64) < n - taken) {
            store_u32(idx + taken * 4, (uint32_t)i);
            store_f32(val + taken * 4, src[i]);
            taken++;
        }
    }
    return n * (sizeof(uint32_t) + sizeof(float));
}

/* ---- dithering ---- */

static int dither_levels_ok(uint32_t levels, int partition) {
    if (partition == RK_DITHER_LINEAR) return levels >= 1 && levels <= RK_DITHER_MAX_LINEAR_LEVELS;
    if (partition == RK_DITHER_NATURAL) return levels >= 1 && levels <= RK_DITHER_MAX_NATURAL_LEVELS;
    return 0;
}

static unsigned dither_code_bits(uint32_t levels) {
    unsigned width = 0;
    while (levels >> width) width++;
    return 1 + width;
}

size_t rk_dithering_max_bytes(size_t count, uint32_t levels, int partition) {
    if (count > RK_CODEC_MAX_COUNT || !dither_levels_ok(levels, partition)) return 0;
    return sizeof(float) + ((uint64_t)count * dither_code_bits(levels) + 7) / 8;
}

/* A code: the level index m that |x| (t = |x| / norm * top) is stochastically
 * rounded to, unbiased, shifted left of the sign.  Linear levels are 0, 1, ..., s;
 * natural 0, 1, 2, 4, ..., 2^(s-1) (index m holds 2^(m-1)), where t in
 * [2^(e-1), 2^e) lies between indices e and e + 1, read off t's float exponent. */
static inline uint32_t dither_code(float x, double per_norm, uint32_t levels, int partition, float u) {
    float t = (float)(fabs((double)x) * per_norm);
    t = t == t ? t : 0.0f;            /* a NaN or inf x of a non-finite norm (per_norm 0): code 0 */
    uint32_t m;
    if (partition == RK_DITHER_LINEAR) {
        /* floor by truncation (t >= 0, at most levels + rounding): floorf is a libm call
         * on baseline x86-64, without SSE4.1's roundss */
        float low = (float)(uint32_t)t;
        m = (uint32_t)low + (u < t - low);
    } else {
        uint32_t bits, low_bits;
        float low;
        memcpy(&bits, &t, sizeof bits);
        low_bits = bits & 0xff800000u;                 /* 2^(e-1): t without its mantissa */
        memcpy(&low, &low_bits, sizeof low);
        low = low > 1.0f ? low : 1.0f;                 /* for t < 1, whose result is not taken: no 0 / 0 */
        uint32_t above_one = ((bits >> 23) - 126) + (u < t / low - 1.0f);
        uint32_t below_one = (uint32_t)(t < 1.0f);     /* selected by masks: a branch on noise mispredicts */
        m = (above_one & (below_one - 1)) | ((uint32_t)(u < t) & (0u - below_one));
    }
    m = m < levels ? m : levels;
    return (m << 1) | ((x < 0.0f) & (m != 0));
}

/* Codes go 8 at a time: 8 codes of w bits are w whole bytes (w <= 16: 128 bits). */
#define DITHER_BLOCK 8

static inline void pack_block(const uint32_t *codes, unsigned width, unsigned char *out, size_t nbytes) {
    unsigned __int128 block = 0;
    for (unsigned j = 0; j < DITHER_BLOCK; j++) block |= (unsigned __int128)codes[j] << (j * width);
    for (size_t b = 0; b < nbytes; b++) out[b] = (unsigned char)(block >> (8 * b));
}

static inline unsigned __int128 load_block(const unsigned char *in, size_t nbytes) {
    unsigned __int128 block = 0;
    for (size_t b = 0; b < nbytes; b++) block |= (unsigned __int128)in[b] << (8 * b);
    return block;
}

size_t rk_dithering_encode(const float *src, size_t count, uint32_t levels, int partition, int normalize,
                           uint64_t *rng, void *dst) {
    size_t total = rk_dithering_max_bytes(count, levels, partition);
    if (total == 0 || (normalize != RK_DITHER_MAX && normalize != RK_DITHER_L2)) return 0;
    float norm = 0.0f;
    if (normalize == RK_DITHER_MAX) {
        /* The largest |x| as the largest sign-less bit pattern: an integer max that
         * vectorizes, and a NaN (above +inf) comes out as the norm. */
        uint32_t largest = 0;
        for (size_t i = 0; i < count; i++) {
            uint32_t magnitude = magnitude_order(src[i]);
            largest = magnitude > largest ? magnitude : largest;
        }
        memcpy(&norm, &largest, sizeof norm);
    } else {
        norm = (float)sqrt(lane_sum(src, count, 1));
    }
    unsigned char *out = dst;
    store_f32(out, norm);
    out += sizeof(float);
    unsigned width = dither_code_bits(levels);
    /* t = |x| / norm * top, top = s (linear) or 2^(s-1) (natural); 0 when norm is 0. */
    double top = partition == RK_DITHER_LINEAR ? (double)levels : ldexp(1.0, (int)levels - 1);
    /* Not finite (src holds an inf or a NaN): every code 0, each decoding to 0 * norm, a NaN. */
    double per_norm = norm > 0.0f && isfinite(norm) ? top / (double)norm : 0.0;
    uint64_t state = *rng;
    for (size_t base = 0; base < count; base += DITHER_BLOCK) {
        size_t n = count - base < DITHER_BLOCK ? count - base : DITHER_BLOCK;
        uint32_t codes[DITHER_BLOCK] = {0};
        for (size_t j = 0; j < n; j++) {
            uint64_t i = base + j;
            float u = unit_float(splitmix_mix(state + (i + 1) * SPLITMIX_GAMMA));
            codes[j] = dither_code(src[i], per_norm, levels, partition, u);
        }
        size_t nbytes = (n * width + 7) / 8;          /* width, but for a last short block */
        pack_block(codes, width, out, nbytes);
        out += nbytes;
    }
    *rng = state + (uint64_t)count * SPLITMIX_GAMMA;
    return total;
}

int rk_dithering_decode_add(const void *src, size_t bytes, float *dst, size_t count, uint32_t levels,
                            int partition) {
    const unsigned char *in = src;
    size_t total = rk_dithering_max_bytes(count, levels, partition);
    if (total == 0 || bytes != total) return -1;
    float norm = load_f32(in);
    if (!scale_ok(norm)) return -1;
    unsigned width = dither_code_bits(levels);
    const unsigned char *codes_in = in + sizeof(float);
    const uint32_t mask = (1u << width) - 1;
    for (size_t base = 0; base < count; base += DITHER_BLOCK) {      /* check every code first */
        size_t n = count - base < DITHER_BLOCK ? count - base : DITHER_BLOCK;
        unsigned __int128 block = load_block(codes_in + base / DITHER_BLOCK * width, (n * width + 7) / 8);
        for (size_t j = 0; j < n; j++) {
            uint32_t code = (uint32_t)(block >> (j * width)) & mask;
            if (code >> 1 > levels || code == 1) return -1;   /* above the levels, or a negative zero */
        }
        if (n < DITHER_BLOCK && block >> (n * width)) return -1;     /* padding bits set */
    }
    float magnitudes[RK_DITHER_MAX_NATURAL_LEVELS + 1];
    float unit = norm / (float)levels;
    if (partition == RK_DITHER_NATURAL) {
        magnitudes[0] = 0.0f * norm;                   /* NaN where norm is not finite, as linear's */
        for (uint32_t m = 1; m <= levels; m++) magnitudes[m] = ldexpf(norm, (int)m - (int)levels);
    }
    for (size_t base = 0; base < count; base += DITHER_BLOCK) {
        size_t n = count - base < DITHER_BLOCK ? count - base : DITHER_BLOCK;
        unsigned __int128 block = load_block(codes_in + base / DITHER_BLOCK * width, (n * width + 7) / 8);
        for (size_t j = 0; j < n; j++) {
            uint32_t code = (uint32_t)(block >> (j * width)) & mask;
            float magnitude = partition == RK_DITHER_LINEAR ? (float)(code >> 1) * unit : magnitudes[code >> 1];
            dst[base + j] += with_sign(magnitude, code & 1u);
        }
    }
    return 0;
}
