/* Gradient compression (codec.h): the dispatch, nesterov momentum and error
 * feedback around any quantizer, and the two quantizers rdmakv has of its own:
 * fp16 and MXNet's 2bit.  BytePS's (onebit, topk, randomk, dithering) are
 * codecs_byteps.c's, plugged into the three switches below. */
#include "codec.h"

#include "codecs_byteps.h"

#include <stdlib.h>
#include <string.h>

/* ---- fp16: a cast for the wire ------------------------------------------------------ */
static void fp16_quantize(const float *w, size_t count, void *dst) {
    _Float16 *out = (_Float16 *)dst;
    for (size_t i = 0; i < count; i++) out[i] = (_Float16)w[i];
}

static void fp16_decode_add(const void *src, float *dst, size_t count) {
    const _Float16 *in = (const _Float16 *)src;
    for (size_t i = 0; i < count; i++) dst[i] += (float)in[i];
}

/* ---- MXNet's 2bit ------------------------------------------------------------------ */
/* Value j of a 16-value block sits in byte j/4 of the block, at these bits for j%4. */
static const uint8_t TWOBIT_POS[4] = {0xc0, 0x30, 0x0c, 0x03};
static const uint8_t TWOBIT_NEG[4] = {0x80, 0x20, 0x08, 0x02};

static size_t twobit_bytes(size_t count) { return 4 * ((count + 15) / 16); }

/* MXNet's quantize_2bit, fused with nesterov momentum when there is some: the
 * residual takes the value in (MXNet: residual += grad), leaves +-threshold in
 * the encoding and keeps the rest.  The arithmetic is MXNet's, operation for
 * operation, so the residual and the encoding are bit for bit its own. */
static size_t twobit_encode(const struct rk_codec *c, struct rk_codec_state *s, const float *src, size_t count,
                            void *dst) {
    const float pos = c->threshold, neg = -1 * c->threshold, mu = c->momentum;
    uint8_t *out = (uint8_t *)dst;
    float *residual = s->residual;
    size_t bytes = twobit_bytes(count);
    memset(out, 0, bytes);
    for (size_t i = 0; i < count; i++) {
        float g = src[i];
        if (mu != 0) {
            s->momentum[i] = g + mu * s->momentum[i];
            g = g + mu * s->momentum[i];
        }
        uint8_t *byte = out + (i >> 4) * 4 + ((i & 15) >> 2);
        residual[i] += g;
        if (residual[i] >= pos) {
            *byte |= TWOBIT_POS[i & 3];
            residual[i] -= pos;
        } else if (residual[i] <= neg) {
            *byte |= TWOBIT_NEG[i & 3];
            residual[i] -= neg;
        }
    }
    return bytes;
}

/* Every field is 11, 10 or 00 (MXNet never writes 01), and the fields past count are 00. */
static int twobit_valid(const uint8_t *in, size_t count) {
    size_t fields = twobit_bytes(count) * 4;
    for (size_t i = 0; i < fields; i++) {
        uint8_t field = in[(i >> 4) * 4 + ((i & 15) >> 2)] & TWOBIT_POS[i & 3];
        if (field == 0) continue;
        if (i >= count || (field != TWOBIT_POS[i & 3] && field != TWOBIT_NEG[i & 3])) return 0;
    }
    return 1;
}

static void twobit_decode_add(const struct rk_codec *c, const uint8_t *in, float *dst, size_t count) {
    const float pos = c->threshold, neg = -1 * c->threshold;
    for (size_t i = 0; i < count; i++) {
        uint8_t field = in[(i >> 4) * 4 + ((i & 15) >> 2)] & TWOBIT_POS[i & 3];
        if (field == TWOBIT_POS[i & 3])
            dst[i] += pos;
        else if (field == TWOBIT_NEG[i & 3])
            dst[i] += neg;
    }
}

/* ---- the quantizers, by kind ---------------------------------------------------------- */
static size_t quantize_max_bytes(const struct rk_codec *c, size_t count) {
    switch (c->kind) {
    case RK_CODEC_NONE: return count * sizeof(float);
    case RK_CODEC_FP16: return count * sizeof(_Float16);
    case RK_CODEC_2BIT: return twobit_bytes(count);
    case RK_CODEC_ONEBIT: return rk_onebit_max_bytes(count);
    case RK_CODEC_TOPK: return rk_topk_max_bytes(count, c->k);
    case RK_CODEC_RANDOMK: return rk_randomk_max_bytes(count, c->k);
    case RK_CODEC_DITHERING: return rk_dithering_max_bytes(count, c->levels, c->dither_partition);
    default: return 0;
    }
}

/* Encode w (the value after momentum and error feedback); the bytes written. */
static size_t quantize(const struct rk_codec *c, uint64_t *rng, const float *w, size_t count, void *dst) {
    switch (c->kind) {
    case RK_CODEC_NONE: memcpy(dst, w, count * sizeof(float)); return count * sizeof(float);
    case RK_CODEC_FP16: fp16_quantize(w, count, dst); return count * sizeof(_Float16);
    case RK_CODEC_ONEBIT: return rk_onebit_encode(w, count, c->scaled, dst);
    case RK_CODEC_TOPK: return rk_topk_encode(w, count, c->k, dst);
    case RK_CODEC_RANDOMK: return rk_randomk_encode(w, count, c->k, rng, dst);
    case RK_CODEC_DITHERING:
        return rk_dithering_encode(w, count, c->levels, c->dither_partition, c->dither_normalize, rng, dst);
    default: return 0;
    }
}

/* dst += decode(src); -1 (dst untouched) when src cannot be an encoding of count values. */
static int decode_add(const struct rk_codec *c, const void *src, size_t bytes, float *dst, size_t count) {
    switch (c->kind) {
    case RK_CODEC_NONE:
        if (bytes != count * sizeof(float)) return -1;
        for (size_t i = 0; i < count; i++) {
            float v;
            memcpy(&v, (const char *)src + i * sizeof(float), sizeof v);
            dst[i] += v;
        }
        return 0;
    case RK_CODEC_FP16:
        if (bytes != count * sizeof(_Float16)) return -1;
        fp16_decode_add(src, dst, count);
        return 0;
    case RK_CODEC_2BIT:
        if (bytes != twobit_bytes(count) || !twobit_valid(src, count)) return -1;
        twobit_decode_add(c, src, dst, count);
        return 0;
    case RK_CODEC_ONEBIT: return rk_onebit_decode_add(src, bytes, dst, count);
    case RK_CODEC_TOPK: return rk_topk_decode_add(src, bytes, dst, count, c->k);
    case RK_CODEC_RANDOMK: return rk_randomk_decode_add(src, bytes, dst, count, c->k);
    case RK_CODEC_DITHERING: return rk_dithering_decode_add(src, bytes, dst, count, c->levels, c->dither_partition);
    default: return -1;
    }
}

/* ---- the pipeline ----------------------------------------------------------------- */
int rk_codec_known(const struct rk_codec *c) {
    return c->kind < RK_CODEC_KINDS;
}

int rk_codec_compresses_pull(const struct rk_codec *c) {
    return c->kind != RK_CODEC_NONE && c->kind != RK_CODEC_2BIT;
}

size_t rk_codec_max_bytes(const struct rk_codec *c, size_t count) { return quantize_max_bytes(c, count); }

static int keeps_residual(const struct rk_codec *c) {
    return c->kind == RK_CODEC_2BIT || c->error_feedback || c->momentum != 0;
}

int rk_codec_state_init(const struct rk_codec *c, struct rk_codec_state *s, size_t count, uint64_t chunk) {
    s->residual = NULL;
    s->momentum = NULL;
    /* splitmix64's increment: distinct, well-spread streams per (seed, chunk). */
    s->rng = c->seed + (chunk + 1) * 0x9E3779B97F4A7C15ull;
    size_t n = count ? count : 1;
    if (keeps_residual(c) && !(s->residual = calloc(n, sizeof(float)))) return -1;
    if (c->momentum != 0 && !(s->momentum = calloc(n, sizeof(float)))) {
        rk_codec_state_free(s);
        return -1;
    }
    return 0;
}

void rk_codec_state_free(struct rk_codec_state *s) {
    free(s->residual);
    free(s->momentum);
    s->residual = s->momentum = NULL;
}

static void negate(float *v, size_t count) {
    for (size_t i = 0; i < count; i++) v[i] = -v[i];
}

size_t rk_codec_encode(const struct rk_codec *c, struct rk_codec_state *s, const float *src, size_t count,
                       void *dst) {
    if (c->kind == RK_CODEC_2BIT) return twobit_encode(c, s, src, count, dst);
    const float *w = src;
    if (c->error_feedback || c->momentum != 0) {
        /* BytePS: m = mu*m + g; p = g + mu*m (NesterovMomentum); w = p + error (ErrorFeedback). */
        float *work = s->residual;
        const float mu = c->momentum;
        for (size_t i = 0; i < count; i++) {
            float p = src[i];
            if (mu != 0) {
                s->momentum[i] = p + mu * s->momentum[i];
                p = p + mu * s->momentum[i];
            }
            work[i] = c->error_feedback ? p + work[i] : p;
        }
        w = work;
    }
    size_t bytes = quantize(c, &s->rng, w, count, dst);
    if (c->error_feedback) {
        /* residual = w - decode(encoding), as -(-w + decode): negation is exact. */
        negate(s->residual, count);
        decode_add(c, dst, bytes, s->residual, count);
        negate(s->residual, count);
    }
    return bytes;
}

int rk_codec_decode_add(const struct rk_codec *c, const void *src, size_t bytes, float *dst, size_t count) {
    return decode_add(c, src, bytes, dst, count);
}
