/* The worker's native data plane: once a key is declared, its pushpulls are
 * queued, sent, received and completed by native threads that never take the
 * GIL (docs/design.md, "The native engine").
 *
 * Objects and their owners:
 *   rk_engine  one per KVStore: the key table, the links, the control mailbox
 *              and the list of finished operations.  Owned by the Cython
 *              Engine; rk_engine_close() joins every thread, then
 *              rk_engine_free() releases it.
 *   rk_link    one per server connection (a connected TCP socket, or the
 *              rings of a shared-memory channel and the Unix socket beside
 *              them, which the engine borrows: the caller closes and unmaps
 *              them after rk_engine_close()).  Its reader thread takes RESULT and
 *              RECEIVED in, and hands every other message to the mailbox; its
 *              sender thread sends queued chunks highest priority first under
 *              a byte credit.
 *   rk_key     a declared key: its chunks (offset, size, link) and the order of
 *              its rounds.  Lives as long as the engine.
 *   rk_op      one pushpull or broadcast.  Its memory belongs to the caller
 *              (the Cython Operation), which must keep it, and the buffers it
 *              points at, until the op comes out of rk_engine_take_finished().
 *
 * Errors are codes and numbers (rk_event); the words are the control plane's
 * (rdmakv/worker/engine_link.py and kvstore.py), which know the peers' names. */
#ifndef RDMAKV_WORKER_ENGINE_H
#define RDMAKV_WORKER_ENGINE_H
#include "wire.h"

typedef struct rk_engine rk_engine;
typedef struct rk_link rk_link;
typedef struct rk_key rk_key;
typedef struct rk_op rk_op;

/* Called by the thread that finishes an op, before waiters are released. */
typedef void (*rk_done_fn)(rk_op *op);
/* A completion in native code, called as complete(engine, param, NULL): MXNet's
 * engine::CallbackOnComplete is three pointers called this way (rdmakv/mxnet/engine.py). */
typedef void (*rk_complete_fn)(void *engine, void *param, const void *error);

/* How an op ended: RK_DONE_OK, or the reason the control plane failed it with. */
enum rk_outcome {
    RK_DONE_OK = 0,
    RK_DONE_LINK_FAILED = 1,  /* failed_link names the link */
    RK_DONE_KEY_FAILED = 2,
    RK_DONE_CANCELLED = 3,    /* the control plane failed it (a closed store, a failed job) */
};

struct rk_op {
    rk_engine *engine;
    rk_key *key;
    const char *source;       /* NULL for a broadcast contribution without data */
    char *target;
    uint64_t round;
    int32_t priority;
    uint32_t flags;
    /* Settled bit and busy count in one word, so exactly one thread sees the
     * moment the outcome is known and no thread is touching the buffers. */
    _Atomic uint32_t life;
    _Atomic uint32_t remaining;   /* chunks whose result has not arrived */
    _Atomic uint32_t done;        /* futex word: 1 once waiters may go */
    _Atomic uint32_t waiters;
    int32_t outcome;          /* enum rk_outcome, written once by the settling thread */
    uint32_t failed_link;
    pthread_mutex_t callback_lock;  /* orders add-a-callback against finishing */
    int finishing;
    int has_callbacks;
    rk_done_fn on_done;
    rk_complete_fn complete;  /* called, without the GIL, only if the op succeeds */
    void *complete_engine;
    void *complete_param;
    void *owner;              /* the caller's object, handed back by rk_engine_take_finished */
    /* Verbs, zero copy: per link, the local key of source and the remote key of
     * target on that link's PD (0: not registered there), or NULL for none. */
    const uint32_t *source_lkeys;
    const uint32_t *target_rkeys;
    rk_op *next;              /* in its key's waiting list, then in the finished list */
};

/* ---- engine --------------------------------------------------------------- */
rk_engine *rk_engine_new(uint32_t num_links, uint64_t credit_bytes, uint64_t small_bytes, double timeout,
                         uint32_t sender_rank);
/* Start a link over a connected socket (non-blocking), or over shared-memory rings
 * with fd the Unix socket beside them (rings NULL: TCP); 0, or an errno. */
int rk_engine_start_link(rk_engine *engine, uint32_t index, int fd, const rk_rings *rings, struct rk_verbs *verbs);
/* Poll for `seconds` before sleeping, in the readers and in rk_op_wait (before starting links). */
void rk_engine_set_spin(rk_engine *engine, double seconds);
/* Stop every thread (reader, sender) and wake every mailbox waiter; idempotent.
 * Afterwards the engine never touches the links' descriptors again. */
void rk_engine_close(rk_engine *engine);
void rk_engine_free(rk_engine *engine);

/* One push per host (_shm.h, host sums): this worker's part, set before any key is
 * declared.  The root waits for `others` contributions to each host sum; via[i]:
 * link i's server is on another host, so pushes to it go through the host. */
enum { RK_HOST_ROOT = 1, RK_HOST_MEMBER = 2 };
void rk_engine_set_host(rk_engine *engine, int role, uint32_t others, const uint8_t *via);

/* ---- keys (declaration: the control plane, once per key) ------------------ */
/* A key with nchunks chunks; chunk i is bytes offsets[i]..+sizes[i] sent to links[i].
 * host_sums (NULL: none): chunk i's host sums at [2i] (even rounds) and [2i + 1],
 * each after its 64-byte control block, in memory that outlives the engine's threads. */
rk_key *rk_engine_add_key(rk_engine *engine, uint64_t wire, uint32_t order, uint8_t dtype, uint32_t nchunks,
                          const uint64_t *offsets, const uint64_t *sizes, const uint32_t *links,
                          char *const *host_sums);
/* The key is refused: fail its pending ops with RK_DONE_KEY_FAILED, drop late results. */
void rk_engine_fail_key(rk_engine *engine, rk_key *key);
struct rk_codec;
/* Compress the chunk's pushpulls with codec (float32 chunks; before the key's first
 * round); 0, or -1 out of memory (what was allocated is freed with the engine). */
int rk_engine_set_codec(rk_key *key, uint32_t index, const struct rk_codec *codec);

/* ---- operations (the caller's thread, no GIL) ------------------------------ */
void rk_op_init(rk_op *op, rk_engine *engine, rk_key *key, const char *source, char *target, int32_t priority,
                uint32_t flags, void *owner);
/* Verbs links: source and target are registered there (arrays of a key per link,
 * 0 for none, the caller's until the op is finished): a chunk of RK_ZERO_COPY_BYTES
 * or more is RDMA-written from source, and its result straight into target. */
void rk_op_set_keys(rk_op *op, const uint32_t *source_lkeys, const uint32_t *target_rkeys);
#define RK_ZERO_COPY_BYTES (64u * 1024)
/* Queue op behind the key's earlier rounds; returns its round. */
uint64_t rk_engine_submit(rk_engine *engine, rk_op *op);
/* 1 once done, 0 after timeout seconds. */
int rk_op_wait(rk_op *op, double timeout);
/* Whether op's outcome is decided, though it may not be done: a thread may still
 * be touching its buffers (a send on a link that makes no progress). */
int rk_op_settled(rk_op *op);
/* Fail every op with a chunk on the link (or, for link == UINT32_MAX, every
 * op) and every later one that needs it. */
void rk_engine_fail_link(rk_engine *engine, uint32_t link, int32_t outcome);
/* Register on_done; 0 if it will be called, 1 if the op already finishes
 * (the caller then runs its callbacks itself). */
int rk_op_want_callback(rk_op *op, rk_done_fn on_done);
/* Have op, if it succeeds, call complete(engine, param, NULL) as it finishes,
 * before on_done's callbacks; if it fails, on_failure is called as on_done (one
 * on_done per op) and complete never.  0 once registered; 1 if op finishes
 * already (the caller completes it, from outcome); -1 if op has a completion. */
int rk_op_complete_with(rk_op *op, rk_complete_fn complete, void *engine, void *param, rk_done_fn on_failure);
/* Ops that finished since the last call, linked through next. */
rk_op *rk_engine_take_finished(rk_engine *engine);
/* The indices of op's chunks still owed by link, up to max; how many there are. */
uint32_t rk_op_owed(rk_op *op, uint32_t link, uint32_t *indices, uint32_t max);

/* ---- control messages ------------------------------------------------------- */
/* Send a header and payload on a link, serialized with its sender; 0 or enum rk_error (sys_errno in *err). */
int rk_link_send(rk_engine *engine, uint32_t link, const char *header, const char *payload, size_t length,
                 int *err);
/* Shared memory: push bytes the link added straight into the server's sums. */
/* Bytes the link's stream sent (out[0]) and received (out[1]) since the engine took it. */
void rk_link_wire_bytes(rk_engine *engine, uint32_t link, uint64_t out[2]);
uint64_t rk_link_summed_bytes(rk_engine *engine, uint32_t link);
/* The largest STATES payload the link's reader takes (set before asking for one). */
void rk_link_allow_states(rk_engine *engine, uint32_t link, uint64_t limit);
/* The next event, or NULL after timeout seconds or once the engine closes. */
rk_event *rk_engine_next_event(rk_engine *engine, double timeout);

#endif
