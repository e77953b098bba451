/* Gradient compression: what one chunk of float32 values becomes on the wire.
 *
 * A key's codec (struct rk_codec) is declared once and is the same on every
 * node; the server learns it from DECLARE.  The node that encodes a chunk owns
 * the chunk's rk_codec_state (the residual kept for error feedback, nesterov
 * momentum, a random stream).  The pipeline of rk_codec_encode, as BytePS's
 * decorators compose it:
 *
 *   p = src, or with momentum mu:  m = mu*m + src;  p = src + mu*m   (NesterovMomentum)
 *   w = p, or with error feedback: w = p + residual                  (ErrorFeedback "vanilla")
 *   encoding = quantize(w)
 *   with error feedback:           residual = w - decode(encoding)
 *
 * 2bit is MXNet 1.9.1's (src/kvstore/gradient_compression-inl.h): the residual
 * is always kept, values packed 16 to a 4-byte block, value j of a block in
 * byte j/4 at bits 7-6, 5-4, 3-2, 1-0 for j%4 = 0..3: 11 = +threshold,
 * 10 = -threshold, 00 = 0.  fp16 is a cast, rounded to nearest even.
 *
 * A quantizer plugs in as three functions with the shapes of quantize_max_bytes,
 * quantize and decode_add below (codec.c's switch), working on w: momentum and
 * error feedback are codec.c's. */
#ifndef RDMAKV_CODEC_H
#define RDMAKV_CODEC_H
#include <stddef.h>
#include <stdint.h>

enum rk_codec_kind {
    RK_CODEC_NONE = 0,
    RK_CODEC_FP16,
    RK_CODEC_2BIT,
    RK_CODEC_ONEBIT,
    RK_CODEC_TOPK,
    RK_CODEC_RANDOMK,
    RK_CODEC_DITHERING,
};
#define RK_CODEC_KINDS 7

struct rk_codec {            /* a key's declared compression: plain values, identical on every node */
    uint8_t kind;            /* enum rk_codec_kind */
    uint8_t error_feedback;  /* BytePS ef "vanilla" (2bit always keeps MXNet's residual) */
    uint8_t scaled;          /* onebit "scaling" */
    uint8_t dither_partition;/* 0 linear, 1 natural */
    uint8_t dither_normalize;/* 0 max, 1 l2 */
    uint32_t k;              /* topk/randomk: elements kept in a chunk (Python turns a ratio into a count per chunk) */
    uint32_t levels;         /* dithering "s" */
    float threshold;         /* 2bit */
    float momentum;          /* nesterov momentum mu; 0 = none */
    uint64_t seed;
};

/* Per chunk, owned by whoever encodes.  residual: count floats when the codec
 * keeps one (error feedback, 2bit), or when momentum needs a place for p;
 * momentum: count floats when momentum != 0; rng: the chunk's random stream. */
struct rk_codec_state {
    float *residual;
    float *momentum;
    uint64_t rng;
};

/* Whether the codec's kind is one this build implements. */
int rk_codec_known(const struct rk_codec *c);
/* Whether the pull (server to worker) is compressed too: BytePS's codecs
 * (the server decompresses, sums, and recompresses the sum); not 2bit (MXNet
 * pulls uncompressed) nor none. */
int rk_codec_compresses_pull(const struct rk_codec *c);
/* Bound on the encoding of count float32 (the exact size for fp16 and 2bit). */
size_t rk_codec_max_bytes(const struct rk_codec *c, size_t count);
/* Zeroed buffers for a chunk of count values (chunk: its index, which seeds rng); 0 or -1 out of memory. */
int rk_codec_state_init(const struct rk_codec *c, struct rk_codec_state *s, size_t count, uint64_t chunk);
void rk_codec_state_free(struct rk_codec_state *s);
/* Encode count float32 at src into dst (rk_codec_max_bytes of room), updating
 * s; the bytes written.  src is only read. */
size_t rk_codec_encode(const struct rk_codec *c, struct rk_codec_state *s, const float *src, size_t count, void *dst);
/* dst += decode(src) for count values; 0, or -1 when the bytes cannot be an
 * encoding of count values (a hostile peer): dst is then untouched. */
int rk_codec_decode_add(const struct rk_codec *c, const void *src, size_t bytes, float *dst, size_t count);

#endif
