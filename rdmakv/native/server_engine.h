/* The server's native data plane: a worker's push of a declared chunk is
 * received, checked against the round it belongs to, summed and answered by
 * native threads; everything else is handed to the control plane
 * (rdmakv/server/server.py) while the link's reader waits for its verdict: a
 * control message whole, a message with limits only the control plane knows
 * (a starting value, optimizer state, a push the engine cannot place) for it
 * to read itself.
 *
 * Objects and their owners:
 *   rk_server  one per server process.  Owned by the Cython ServerEngine;
 *              rk_server_close() joins every thread, rk_server_free() releases it.
 *   link       one per worker, by rank: a connected TCP socket, or a
 *              shared-memory channel's rings, the server borrows after the
 *              worker's CONNECT (the caller closes the descriptor and unmaps
 *              the rings after rk_server_close()), a reader thread and a
 *              reply thread that answers highest priority first.
 *   rk_schunk  a chunk held here: its round, who pushed, and two round buffers
 *              (alternate rounds) that belong to the caller and must live as
 *              long as the server.
 *
 * The sum is made here and only here (sum_push): the round's first push is
 * copied into the round buffer, later ones are added with _reduce.h's
 * kernels; the last one completes the round.
 *
 * Asynchronous mode (RDMAKV_MODE=async; a chunk added with snapshots): rounds
 * are counted per worker and there is no barrier across workers.  A push is
 * added into the chunk's stored value as it arrives (or, with an optimizer,
 * handed to the control plane to apply), and the worker is answered with a
 * copy of the stored value taken right after, in its own snapshot buffer: the
 * stored value goes on changing while the reply is sent.  Only a broadcast
 * still waits for every worker: the root's value replaces the stored value,
 * and each worker gets the stored value once the last one is in. */
#ifndef RDMAKV_SERVER_ENGINE_H
#define RDMAKV_SERVER_ENGINE_H
#include "wire.h"

typedef struct rk_server rk_server;
typedef struct rk_skey rk_skey;
typedef struct rk_schunk rk_schunk;

/* Why a push was refused (RK_EVENT_REFUSED's error; the control plane words it). */
enum rk_refusal {
    RK_REFUSE_KEY_FAILED = 1,  /* the key was refused before */
    RK_REFUSE_DEPARTED,        /* a worker left: no round can complete */
    RK_REFUSE_DTYPE,           /* limit: the declared dtype code */
    RK_REFUSE_ROUND,           /* limit: the round the chunk is at */
    RK_REFUSE_TWICE,           /* the worker pushed this round already */
    RK_REFUSE_MIXED,           /* broadcast and pushpull in one round */
    RK_REFUSE_TWO_ROOTS,       /* two workers sent the root value of a broadcast */
    RK_REFUSE_NO_ROOT,         /* nobody sent the root value of a broadcast */
    RK_REFUSE_UNDECLARED,      /* the worker never declared the key: its link stops */
    RK_REFUSE_SUM_STALLED,     /* a shared sum's lock stayed held past the timeout (a co-located worker) */
    RK_REFUSE_ENCODING,        /* a compressed push that is no encoding of the chunk (codec.h) */
    RK_REFUSE_BROADCAST_OPEN,  /* asynchronous mode: a pushpull while the worker's broadcast part is open */
};

/* Verdicts of the control plane on a message it read itself. */
enum { RK_VERDICT_CONTINUE = 1, RK_VERDICT_STOP = 2 };

rk_server *rk_server_new(uint32_t num_workers, double timeout, uint64_t direct_bytes);
/* Take over a worker's connected socket (non-blocking), or the rings of its
 * shared-memory channel with fd the Unix socket beside them; 0, or an errno. */
int rk_server_start_link(rk_server *server, uint32_t rank, int fd, const rk_rings *rings, struct rk_verbs *verbs);
/* Poll for `seconds` for a worker's next message before sleeping (before starting links). */
void rk_server_set_spin(rk_server *server, double seconds);
/* Stop every thread; idempotent.  The descriptors are the caller's again. */
void rk_server_close(rk_server *server);
void rk_server_free(rk_server *server);

/* ---- the control plane's side ------------------------------------------------ */
rk_skey *rk_server_add_key(rk_server *server, uint64_t wire);
/* places: NULL, or the buffers' (segment, offset, segment, offset) in memory files
 * co-located workers may map (then they add into the sums themselves). */
rk_schunk *rk_server_add_chunk(rk_server *server, rk_skey *key, uint32_t index, uint8_t dtype, uint64_t nbytes,
                               char *buffer0, char *buffer1, const uint64_t *places);
/* Asynchronous mode: stored is the chunk's value, snapshots num_workers * nbytes
 * bytes where each worker's reply is copied (both the caller's, living as long as
 * the server). */
rk_schunk *rk_server_add_async_chunk(rk_server *server, rk_skey *key, uint32_t index, uint8_t dtype,
                                     uint64_t nbytes, char *stored, char *snapshots);
struct rk_codec;
/* Gradient compression for a (synchronous, private) float32 chunk's pushpulls,
 * before any worker's declaration is answered; 0, or -1 out of memory. */
int rk_server_set_codec(rk_schunk *chunk, const struct rk_codec *codec);
/* Asynchronous mode: replace the stored value (a starting value, INIT). */
void rk_server_set_value(rk_schunk *chunk, const char *data);
/* Asynchronous mode: hold the chunk's lock while the control plane applies a push
 * with its optimizer (a broadcast may replace the stored value meanwhile). */
void rk_server_hold_chunk(rk_schunk *chunk);
void rk_server_release_chunk(rk_schunk *chunk);
/* The worker at rank has our memory file `number` (its fd was passed to it):
 * results in it go to that worker as places, and it may add into sums there. */
void rk_server_link_has_segment(rk_server *server, uint32_t rank, uint32_t number);
void rk_server_declared_by(rk_skey *key, uint32_t rank);
void rk_server_refuse_key(rk_skey *key);
/* A worker left: every push from now on is refused. */
void rk_server_departed(rk_server *server);
/* With an optimizer, a summed round goes to the control plane (RK_EVENT_SUMMED) instead of out;
 * in asynchronous mode each push does, landed in the worker's snapshot buffer (RK_EVENT_PUSHED),
 * and the control plane answers with rk_server_reply_one. */
void rk_server_set_optimizer(rk_server *server, int on);
/* One push per host: this worker pushes plain pushpulls through its host's root
 * (RK_FLAG_VIA_HOST, no bytes), and takes their results from its host. */
void rk_server_allow_via_host(rk_server *server, uint32_t rank);
/* Send RESULT of (key, chunk, round) with data to every connected worker (after an update;
 * encoded first where the chunk's codec compresses the pull). */
void rk_server_reply_all(rk_server *server, rk_schunk *chunk, uint64_t round, int32_t priority, const char *data);
/* Asynchronous mode: RESULT of (key, chunk, round) to worker rank from its snapshot buffer. */
void rk_server_reply_one(rk_server *server, rk_schunk *chunk, uint32_t rank, uint64_t round, int32_t priority);
/* Send a message on a worker's link, serialized with its reply thread; 0 or enum rk_error. */
int rk_server_send(rk_server *server, uint32_t rank, const char *header, const char *payload, size_t length,
                   int *err);
/* While the link's reader waits for a verdict: move up to n bytes it read ahead
 * (the start of the message's payload) into dst; how many.  The rest is on the socket. */
size_t rk_server_take_buffered(rk_server *server, uint32_t rank, char *dst, size_t n);
/* The control plane handled the message the link's reader waits on. */
void rk_server_answer(rk_server *server, uint32_t rank, int verdict);
rk_event *rk_server_next_event(rk_server *server, double timeout);

/* Rounds open longer than `patience` seconds and not reported yet (a broadcast's, in
 * asynchronous mode): fills up to max (wire, chunk) pairs, the pushed bitmaps
 * (words_per_chunk words each) and the round each worker's push there belongs to
 * (num_workers each: the chunk's round; in asynchronous mode the worker's own);
 * returns how many were found.  Each is reported once. */
uint32_t rk_server_stale_rounds(rk_server *server, double patience, uint64_t *pairs, uint64_t *pushed,
                                uint64_t *rounds, uint32_t max);
/* Whether any chunk of the key has pushes in its open round. */
int rk_server_key_has_pushes(rk_skey *key);
uint32_t rk_server_words_per_chunk(rk_server *server);
/* Bytes the worker's link sent (out[0]) and received (out[1]) since the engine took it. */
void rk_server_link_wire_bytes(rk_server *server, uint32_t rank, uint64_t out[2]);

#endif
