/* The worker's native data plane (worker_engine.h): the per-message path of a
 * pushpull, with no Python object touched.  Locks, from outer to inner:
 * order_lock (a key's rounds), then one link's lock (its queue, credit and the
 * results it owes), then its send_lock (the socket's byte stream).  keys_lock
 * (the wire -> key table) is never held with another.  No lock is held while
 * an op finishes: finishing may call into Python (rk_done_fn takes the GIL) or
 * into MXNet's engine (rk_complete_fn). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "worker_engine.h"

#include "codec.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>


#define RK_CLAIMED 0x80000000u    /* rk_op.life: one thread settles the outcome */
#define RK_SETTLED 0x40000000u    /* rk_op.life: the outcome is written */
#define RK_BUSY_MASK 0x3fffffffu  /* rk_op.life: threads touching the op's buffers */

typedef struct {
    uint64_t offset;
    uint64_t nbytes;
    uint32_t link;
    rk_op *op;                    /* whose result the link owes for this chunk (link lock) */
    int credited;                 /* that op's push holds credit until RECEIVED or RESULT */
    int sent;                     /* that op's push has left: only then may its result come */
    int placed;                   /* verbs: that push asked for its result RDMA-written into the target */
    /* Shared memory: the server's round buffers this chunk's pushes are added
     * into here (even, odd rounds), once it offered them; set once by the reader. */
    char *sums[2];
    _Atomic int offered;
    /* 1 + the last round whose result arrived: a push is added into a shared sum
     * only as the round after it, since only then has every worker copied the
     * result that buffer held two rounds before (a cancelled round breaks the chain). */
    _Atomic uint64_t rounds_done;
    /* Gradient compression (codec.h), set once before the key's first round: a
     * pushpull's push leaves as the encoding of the chunk (the sender encodes it
     * into `encoded`, the key's rounds never overlapping), and where the codec
     * compresses the pull too, its result arrives encoded into `pulled`. */
    int compressed;
    struct rk_codec codec;
    struct rk_codec_state state;
    char *encoded, *pulled;
    uint64_t max_encoded;
    /* One push per host: the host's sums of this chunk (even, odd rounds; _shm.h),
     * in memory the host's workers share; NULL where its pushes go as they are. */
    char *host_sums[2];
} rk_chunk;

struct rk_key {
    uint64_t wire;
    uint32_t order;
    uint8_t dtype;
    uint32_t nchunks;
    uint64_t max_chunk;
    rk_chunk *chunks;
    _Atomic int failed;
    uint64_t next_round;          /* order_lock, like active and the waiting list */
    rk_op *active;
    rk_op *waiting_head, *waiting_tail;
    rk_key *next_declared;
};

struct rk_link {
    rk_engine *engine;
    uint32_t index;
    rk_stream stream;
    int started;
    pthread_t reader, sender;
    pthread_mutex_t lock;
    pthread_cond_t ready;
    rk_queue queue;               /* chunks waiting to be sent: ref is the op, tag unused */
    uint64_t in_flight;           /* credited bytes sent whose RECEIVED or RESULT is not back */
    uint32_t credited_chunks;
    uint32_t unanswered;          /* chunks sent whose result has not come (nor been given up) */
    int sending;                  /* a thread is sending a queued chunk */
    int failed;                   /* set by the control plane: start nothing new here */
    int send_failed;              /* reported once */
    pthread_mutex_t send_lock;
    _Atomic uint64_t states_limit;
    char *scratch;                /* where dropped results land (the reader's) */
    size_t scratch_size;
    rk_segments segments;         /* shared memory: the server's memory files (the reader's) */
    _Atomic uint64_t summed_bytes;  /* shared memory: push bytes added straight into the server's sums */
    int via_host;                 /* one push per host: its server is on another host */
};

struct rk_engine {
    uint32_t num_links;
    rk_link *links;
    uint64_t credit_bytes;
    uint64_t small_bytes;         /* chunks this small hold no credit */
    double timeout;
    uint32_t sender_rank;
    pthread_rwlock_t keys_lock;
    rk_table table;               /* (wire, 0) -> rk_key */
    rk_key *declared;
    pthread_mutex_t order_lock;
    pthread_mutex_t finished_lock;
    rk_op *finished;
    rk_mailbox mailbox;
    int closed;                   /* rk_engine_close ran: the links' descriptors are the caller's again */
    pid_t pid;                    /* the process that owns the threads */
    double spin;                  /* seconds a reader or a waiter polls before sleeping */
    int host_role;                /* one push per host: RK_HOST_ROOT, RK_HOST_MEMBER, or 0 */
    uint32_t host_others;         /* the root: how many other workers of its host contribute */
};

static void post_error(rk_link *link, uint32_t kind, int error, int sys_errno, const rk_header *h, uint64_t limit) {
    rk_event *event = rk_event_new(link->index, kind, error, sys_errno, h, limit);
    if (event) rk_mailbox_post(&link->engine->mailbox, event);   /* else the link still stops */
}

rk_event *rk_engine_next_event(rk_engine *engine, double timeout) {
    return rk_mailbox_next(&engine->mailbox, timeout);
}

/* ---- operations: settling and finishing -------------------------------------------- */
static void start(rk_op *op);
static void enqueue_chunks(rk_op *op);

static int busy_acquire(rk_op *op) {
    uint32_t life = atomic_load(&op->life);
    do {
        if (life & RK_CLAIMED) return 0;
    } while (!atomic_compare_exchange_weak(&op->life, &life, life + 1));
    return 1;
}

static void finish(rk_op *op) {
    rk_engine *engine = op->engine;
    rk_key *key = op->key;
    pthread_mutex_lock(&op->callback_lock);
    op->finishing = 1;
    int succeeded = op->outcome == RK_DONE_OK;
    if (op->complete && !succeeded) op->has_callbacks = 1;   /* the failure is told through on_done */
    int call = op->has_callbacks;
    rk_complete_fn complete = succeeded ? op->complete : NULL;
    pthread_mutex_unlock(&op->callback_lock);
    if (complete) complete(op->complete_engine, op->complete_param, NULL);
    if (call && op->on_done) op->on_done(op);
    /* Pairs with rk_op_wait: each side writes its word, then reads the other's (seq_cst). */
    atomic_store(&op->done, 1);
    if (atomic_load(&op->waiters)) rk_futex_wake(&op->done);
    rk_op *following = NULL;
    pthread_mutex_lock(&engine->order_lock);
    if (key->active == op) {
        following = key->waiting_head;
        if (following) {
            key->waiting_head = following->next;
            if (key->waiting_head == NULL) key->waiting_tail = NULL;
            following->next = NULL;
        }
        key->active = following;
    }
    pthread_mutex_unlock(&engine->order_lock);
    pthread_mutex_lock(&engine->finished_lock);
    op->next = engine->finished;
    engine->finished = op;         /* from here on only the caller touches op */
    pthread_mutex_unlock(&engine->finished_lock);
    if (following) start(following);
}

static void busy_release(rk_op *op) {
    if (atomic_fetch_sub(&op->life, 1) - 1 == (RK_CLAIMED | RK_SETTLED)) finish(op);
}

/* Claim op's outcome; 0 if another thread settled it first. */
static int claim(rk_op *op) {
    uint32_t life = atomic_load(&op->life);
    do {
        if (life & RK_CLAIMED) return 0;
    } while (!atomic_compare_exchange_weak(&op->life, &life, life | RK_CLAIMED));
    return 1;
}

/* The claimed outcome is written: finish now unless a thread still touches the buffers. */
static void publish(rk_op *op) {
    if (((atomic_fetch_or(&op->life, RK_SETTLED) | RK_SETTLED) & RK_BUSY_MASK) == 0) finish(op);
}

static void return_credit(rk_link *link, rk_chunk *chunk) {   /* the caller holds link->lock */
    if (chunk->credited) {
        chunk->credited = 0;
        link->in_flight -= chunk->nbytes;
        link->credited_chunks--;
        pthread_cond_signal(&link->ready);
    }
}

/* The link owes chunk's op nothing more (the caller holds link->lock). */
static void release_chunk(rk_link *link, rk_chunk *chunk) {
    chunk->op = NULL;
    return_credit(link, chunk);
    if (chunk->sent) link->unanswered--;
}

/* Fail op (not yet settled by anyone else): forget what the links owe it, then settle. */
static void cancel(rk_op *op, int32_t outcome, uint32_t failed_link) {
    if (!claim(op)) return;
    op->outcome = outcome;
    op->failed_link = failed_link;
    rk_key *key = op->key;
    for (uint32_t i = 0; i < key->nchunks; i++) {
        rk_chunk *chunk = &key->chunks[i];
        rk_link *link = &op->engine->links[chunk->link];
        pthread_mutex_lock(&link->lock);
        if (chunk->op == op) release_chunk(link, chunk);
        rk_queue_remove_ref(&link->queue, op);
        pthread_mutex_unlock(&link->lock);
    }
    publish(op);
}

/* The next chunk that may go (the caller holds link->lock): credit permitting; a
 * chunk larger than the whole credit still goes when nothing else is in flight.
 * Its op comes with a busy reference (transmit drops it): from here until the
 * bytes are sent, the op and its buffers cannot go away. */
static int pop_ready(rk_link *link, rk_item *out) {
    for (;;) {
        const rk_item *top = rk_queue_top(&link->queue);
        if (top == NULL) return 0;
        uint64_t limit = link->engine->credit_bytes;
        if (limit && top->credit && link->credited_chunks && link->in_flight + top->credit > limit) return 0;
        *out = rk_queue_pop(&link->queue);
        rk_op *op = out->ref;
        if (!busy_acquire(op)) continue;      /* failing: cancel() forgets its chunks */
        rk_chunk *chunk = &op->key->chunks[out->chunk];
        chunk->sent = 1;
        chunk->placed = link->stream.verbs && op->target_rkeys && op->target_rkeys[link->index] &&
                        chunk->nbytes >= RK_ZERO_COPY_BYTES && !chunk->compressed &&
                        !(link->via_host && chunk->host_sums[0]);   /* a host's result is its root's */
        link->unanswered++;
        if (out->credit) {
            chunk->credited = 1;
            link->in_flight += out->credit;
            link->credited_chunks++;
        }
        return 1;
    }
}

/* ---- sending ---------------------------------------------------------------------- */
static void report_send_failure(rk_link *link, int error, int sys_errno) {
    pthread_mutex_lock(&link->lock);
    int first = !link->send_failed;
    link->send_failed = 1;
    pthread_mutex_unlock(&link->lock);
    if (first) post_error(link, RK_EVENT_SEND_FAILED, error, sys_errno, NULL, 0);
}

/* How long a sender waits for a shared sum's lock before sending the push's bytes
 * instead (the server then adds them, and answers for a lock that stays held). */
#define SUM_LOCK_PATIENCE 0.02

/* Shared memory: add op's push of chunk straight into the sum the server offered
 * for it (under the sum's lock, shared with the server and other workers), when
 * that is safe now: 1 when added, 0 when its bytes must be sent instead,
 * RK_STOPPED when the engine closes. */
static int add_to_shared_sum(rk_link *link, rk_key *key, rk_chunk *chunk, rk_op *op) {
    if (op->flags != 0 || chunk->nbytes == 0 || !atomic_load_explicit(&chunk->offered, memory_order_acquire) ||
        atomic_load(&chunk->rounds_done) != op->round)
        return 0;
    size_t itemsize = 1;
    rk_add_fn add = rk_adder(key->dtype, &itemsize);
    if (add == NULL) return 0;
    double patience = link->engine->timeout < SUM_LOCK_PATIENCE ? link->engine->timeout : SUM_LOCK_PATIENCE;
    int rc = rdmakv_sum_contribute(chunk->sums[op->round % 2], op->source + chunk->offset, chunk->nbytes,
                                   (rdmakv_add_fn)add, itemsize, op->round, patience, &link->stream.stop);
    if (rc == RDMAKV_SHM_STOPPED) return RK_STOPPED;
    if (rc != 0) return 0;
    atomic_fetch_add(&link->summed_bytes, chunk->nbytes);
    return 1;
}

/* Whether op's push of chunk goes through the host's sum (one push per host):
 * a plain pushpull of a chunk with data, to a server on another host. */
static int via_host(const rk_link *link, const rk_chunk *chunk, const rk_op *op) {
    return link->via_host && chunk->host_sums[0] && chunk->nbytes && op->flags == 0 && !chunk->compressed;
}

/* One push per host, before op's push of chunk is sent: a local worker adds it
 * into the host's sum; the root waits for theirs, then adds its own.  RK_OK,
 * RK_STOPPED (closing, or the op failed meanwhile: nothing is sent), or
 * RK_ERR_HOST_STALLED. */
static int host_push(rk_link *link, rk_key *key, rk_chunk *chunk, rk_op *op) {
    rk_engine *engine = link->engine;
    size_t itemsize = 1;
    rk_add_fn add = rk_adder(key->dtype, &itemsize);
    char *sum = chunk->host_sums[op->round % 2];
    const char *source = op->source + chunk->offset;
    int rc = engine->host_role == RK_HOST_ROOT
                 ? rdmakv_host_complete(sum, source, chunk->nbytes, (rdmakv_add_fn)add, itemsize, op->round,
                                        engine->host_others, engine->timeout, &link->stream.stop, &op->life,
                                        RK_CLAIMED)
                 : rdmakv_host_contribute(sum, source, chunk->nbytes, (rdmakv_add_fn)add, itemsize, op->round,
                                          engine->timeout, &link->stream.stop);
    if (rc == RDMAKV_SHM_TIMEOUT) return RK_ERR_HOST_STALLED;
    return rc ? RK_STOPPED : RK_OK;
}

/* Send popped chunks with one sendmsg, drop their busy references, then let the
 * next sender in (the caller set link->sending).  may_add: pushes may be added
 * into offered sums (the sender thread; a submitting thread must not wait for a lock).
 * A host push is made either way: only the host's workers take its lock, each for
 * one chunk's add, and a root's wait for the others never runs in a submitting
 * thread (enqueue_chunks). */
static void transmit(rk_link *link, const rk_item *items, int count, int may_add) {
    char packed[RK_BATCH][RK_HEADER_SIZE];
    char places[RK_BATCH][RK_PLACE_RESULT_SIZE];
    struct iovec iov[3 * RK_BATCH];
    uint32_t lkeys[3 * RK_BATCH];
    int parts = 0, rc = RK_OK, err = 0;
    for (int i = 0; i < count && rc == RK_OK; i++) {
        rk_op *op = items[i].ref;         /* busy since pop_ready */
        rk_key *key = op->key;
        rk_chunk *chunk = &key->chunks[items[i].chunk];
        int no_data = (op->flags & RK_FLAG_NO_DATA) != 0;
        /* Only a pushpull's push is compressed: a broadcast's root value goes whole. */
        int encode = chunk->compressed && op->flags == 0;
        rk_header h = {.magic = RK_MAGIC, .version = RK_VERSION, .op = RK_OP_PUSH, .dtype = key->dtype,
                       .flags = op->flags | (items[i].credit ? RK_FLAG_ACK : 0), .key = key->wire,
                       .chunk = items[i].chunk, .priority = op->priority, .round = op->round,
                       .length = no_data ? 0 : chunk->nbytes, .sender = link->engine->sender_rank};
        const char *payload = op->source + chunk->offset;
        int summed = 0;
        if (via_host(link, chunk, op)) {
            int host = host_push(link, key, chunk, op);
            if (host == RK_STOPPED) {
                if (!__atomic_load_n(&link->stream.stop, __ATOMIC_ACQUIRE)) continue;   /* the op failed */
                rc = RK_STOPPED;
            } else if (host != RK_OK) {
                rc = host;
            } else if (link->engine->host_role == RK_HOST_ROOT) {
                payload = chunk->host_sums[op->round % 2];
            } else {
                h.flags |= RK_FLAG_VIA_HOST;
                h.length = 0;
            }
        } else {
            summed = may_add && !chunk->compressed ? add_to_shared_sum(link, key, chunk, op) : 0;
            if (summed == RK_STOPPED) rc = RK_STOPPED;
            if (summed == 1) h.flags |= RK_IN_PLACE;
            if (encode && h.length) {
                h.length = rk_codec_encode(&chunk->codec, &chunk->state, (const float *)payload, chunk->nbytes / 4,
                                           chunk->encoded);
                payload = chunk->encoded;
            }
        }
        if (chunk->placed) {              /* set by pop_ready: the link is verbs, the target registered */
            uint64_t at = (uintptr_t)(op->target + chunk->offset);
            memcpy(places[i], &at, 8);
            memcpy(places[i] + 8, &op->target_rkeys[link->index], 4);
            h.flags |= RK_PLACE_RESULT;
        }
        rk_header_pack(packed[i], &h);
        lkeys[parts] = 0;
        iov[parts++] = (struct iovec){packed[i], RK_HEADER_SIZE};
        if (chunk->placed) {
            lkeys[parts] = 0;
            iov[parts++] = (struct iovec){places[i], RK_PLACE_RESULT_SIZE};
        }
        if (h.length && summed != 1) {
            int from_source = payload == op->source + chunk->offset;   /* not an encoding, not a host's sum */
            uint32_t lkey = op->source_lkeys && from_source ? op->source_lkeys[link->index] : 0;
            lkeys[parts] = chunk->nbytes >= RK_ZERO_COPY_BYTES ? lkey : 0;
            iov[parts++] = (struct iovec){(char *)payload, h.length};
        }
    }
    if (parts && rc == RK_OK) {
        pthread_mutex_lock(&link->send_lock);
        rc = rk_send_registered(&link->stream, iov, lkeys, parts, &err);
        pthread_mutex_unlock(&link->send_lock);
    }
    for (int i = 0; i < count; i++) busy_release(items[i].ref);   /* every popped one, sent or not */
    if (rc && rc != RK_STOPPED) report_send_failure(link, rc, err);
    pthread_mutex_lock(&link->lock);
    link->sending = 0;
    if (link->queue.count) pthread_cond_signal(&link->ready);
    pthread_mutex_unlock(&link->lock);
}

static void *sender_main(void *arg) {
    rk_link *link = arg;
    rk_item items[RK_BATCH];
    pthread_mutex_lock(&link->lock);
    for (;;) {
        while (!link->stream.stop && (link->sending || !pop_ready(link, &items[0])))
            pthread_cond_wait(&link->ready, &link->lock);
        if (link->stream.stop) break;
        /* What else may go now leaves in the same sendmsg: one system call, not one a chunk. */
        int count = 0;
        uint64_t bytes = 0;
        do {
            bytes += ((rk_op *)items[count].ref)->key->chunks[items[count].chunk].nbytes;
            count++;
        } while (count < RK_BATCH && bytes < RK_BATCH_BYTES && pop_ready(link, &items[count]));
        link->sending = 1;
        pthread_mutex_unlock(&link->lock);
        transmit(link, items, count, 1);
        pthread_mutex_lock(&link->lock);
    }
    pthread_mutex_unlock(&link->lock);
    return NULL;
}

int rk_link_send(rk_engine *engine, uint32_t index, const char *header, const char *payload, size_t length,
                 int *err) {
    rk_link *link = &engine->links[index];
    struct iovec iov[2] = {{(char *)header, RK_HEADER_SIZE}, {(char *)payload, length}};
    pthread_mutex_lock(&link->send_lock);
    int rc = rk_send_all(&link->stream, iov, length ? 2 : 1, err);
    pthread_mutex_unlock(&link->send_lock);
    return rc;
}

/* ---- starting an op: its chunks go to their links' queues -------------------------- */
/* Queue op's chunks, holding a busy reference so that a failure running at the
 * same time cannot finish (and free) it under our hands. */
static void start(rk_op *op) {
    if (!busy_acquire(op)) return;        /* failed before it started */
    enqueue_chunks(op);
    busy_release(op);
}

static void enqueue_chunks(rk_op *op) {
    rk_engine *engine = op->engine;
    rk_key *key = op->key;
    if (atomic_load(&key->failed)) {
        cancel(op, RK_DONE_KEY_FAILED, 0);
        return;
    }
    if (key->nchunks == 0) {
        if (claim(op)) {
            op->outcome = RK_DONE_OK;
            publish(op);
        }
        return;
    }
    for (uint32_t i = 0; i < key->nchunks; i++) {
        rk_chunk *chunk = &key->chunks[i];
        rk_link *link = &engine->links[chunk->link];
        rk_item item = {.priority = op->priority, .order = key->order, .chunk = i, .ref = op,
                        .credit = (chunk->nbytes > engine->small_bytes && engine->credit_bytes) ? chunk->nbytes : 0};
        pthread_mutex_lock(&link->lock);
        if (link->failed || atomic_load(&op->life) & RK_CLAIMED) {
            uint32_t failed = link->index;
            int link_failed = link->failed;
            pthread_mutex_unlock(&link->lock);
            if (link_failed) cancel(op, RK_DONE_LINK_FAILED, failed);
            return;
        }
        chunk->op = op;
        chunk->credited = 0;
        chunk->sent = 0;
        if (rk_queue_push(&link->queue, item)) {
            chunk->op = NULL;
            pthread_mutex_unlock(&link->lock);
            cancel(op, RK_DONE_CANCELLED, 0);
            return;
        }
        /* A small chunk with nothing ahead of it is sent by this thread (never added
         * into a shared sum, which may mean waiting for its lock): no hand-off to
         * the sender thread.  Over a ring, when the ring has room for it now (a copy,
         * and no system call unless the server sleeps); over TCP, when the link owes
         * nothing else, so that a lone pushpull is quick while a caller that starts
         * many small ones in a row pays no system call for each: those leave from
         * the sender thread, in batches. */
        int idle = rk_stream_buffered(&link->stream) ? rk_stream_room(&link->stream) >= RK_HEADER_SIZE + chunk->nbytes
                                          : link->unanswered == 0;
        rk_item popped;
        /* (A root's host push waits for its host's others: never from the caller's thread.) */
        int waits = engine->host_role == RK_HOST_ROOT && via_host(link, chunk, op);
        if (idle && !waits && !link->sending && link->queue.count == 1 && chunk->nbytes <= engine->small_bytes &&
            pop_ready(link, &popped)) {
            link->sending = 1;
            pthread_mutex_unlock(&link->lock);
            transmit(link, &popped, 1, 0);
            continue;
        }
        pthread_cond_signal(&link->ready);
        pthread_mutex_unlock(&link->lock);
    }
}

void rk_op_init(rk_op *op, rk_engine *engine, rk_key *key, const char *source, char *target, int32_t priority,
                uint32_t flags, void *owner) {
    memset(op, 0, sizeof *op);
    op->engine = engine;
    op->key = key;
    op->source = source;
    op->target = target;
    op->priority = priority;
    op->flags = flags;
    op->owner = owner;
    atomic_init(&op->remaining, key->nchunks);
    pthread_mutex_init(&op->callback_lock, NULL);
}

void rk_op_set_keys(rk_op *op, const uint32_t *source_lkeys, const uint32_t *target_rkeys) {
    op->source_lkeys = source_lkeys;
    op->target_rkeys = target_rkeys;
}

uint64_t rk_engine_submit(rk_engine *engine, rk_op *op) {
    rk_key *key = op->key;
    pthread_mutex_lock(&engine->order_lock);
    op->round = key->next_round++;
    int now = key->active == NULL;
    if (now) {
        key->active = op;
    } else {
        if (key->waiting_tail) key->waiting_tail->next = op;
        else key->waiting_head = op;
        key->waiting_tail = op;
    }
    pthread_mutex_unlock(&engine->order_lock);
    if (now) start(op);
    return op->round;
}

int rk_op_wait(rk_op *op, double timeout) {
    if (atomic_load(&op->done)) return 1;
    atomic_fetch_add(&op->waiters, 1);
    rk_spin_then_wait(&op->done, 0, op->engine->spin, rk_now() + timeout);
    atomic_fetch_sub(&op->waiters, 1);
    return (int)atomic_load(&op->done);
}

int rk_op_settled(rk_op *op) {
    return (atomic_load(&op->life) & RK_SETTLED) != 0;
}

int rk_op_want_callback(rk_op *op, rk_done_fn on_done) {
    pthread_mutex_lock(&op->callback_lock);
    int state = 0;
    if (op->finishing) {
        state = op->has_callbacks ? 1 : 2;
    } else {
        op->has_callbacks = 1;
        op->on_done = on_done;
    }
    pthread_mutex_unlock(&op->callback_lock);
    return state;
}

int rk_op_complete_with(rk_op *op, rk_complete_fn complete, void *engine, void *param, rk_done_fn on_failure) {
    pthread_mutex_lock(&op->callback_lock);
    int state = op->finishing ? 1 : op->complete ? -1 : 0;
    if (state == 0) {
        op->complete = complete;
        op->complete_engine = engine;
        op->complete_param = param;
        op->on_done = on_failure;
    }
    pthread_mutex_unlock(&op->callback_lock);
    return state;
}

rk_op *rk_engine_take_finished(rk_engine *engine) {
    pthread_mutex_lock(&engine->finished_lock);
    rk_op *list = engine->finished;
    engine->finished = NULL;
    pthread_mutex_unlock(&engine->finished_lock);
    return list;
}

uint32_t rk_op_owed(rk_op *op, uint32_t index, uint32_t *indices, uint32_t max) {
    rk_key *key = op->key;
    rk_link *link = &op->engine->links[index];
    uint32_t count = 0;
    pthread_mutex_lock(&link->lock);
    for (uint32_t i = 0; i < key->nchunks; i++) {
        if (key->chunks[i].link == index && key->chunks[i].op == op) {
            if (count < max) indices[count] = i;
            count++;
        }
    }
    pthread_mutex_unlock(&link->lock);
    return count;
}

/* Take the key's active op and waiting list (order_lock), to fail them. */
/* Fail the key's active op and the rounds waiting behind it.  The waiting ones
 * are taken off the key (nobody else reaches them then); the active one only
 * while a busy reference keeps it from finishing under our hands: if it is
 * finishing already, it starts nothing, as the waiting list is empty. */
static void cancel_pending(rk_engine *engine, rk_key *key, int32_t outcome, uint32_t failed_link) {
    pthread_mutex_lock(&engine->order_lock);
    rk_op *waiting = key->waiting_head;
    key->waiting_head = key->waiting_tail = NULL;
    rk_op *active = key->active && busy_acquire(key->active) ? key->active : NULL;
    pthread_mutex_unlock(&engine->order_lock);
    if (active) {
        cancel(active, outcome, failed_link);
        busy_release(active);
    }
    while (waiting) {
        rk_op *next = waiting->next;   /* finishing reuses next */
        cancel(waiting, outcome, failed_link);
        waiting = next;
    }
}

void rk_engine_fail_key(rk_engine *engine, rk_key *key) {
    atomic_store(&key->failed, 1);
    cancel_pending(engine, key, RK_DONE_KEY_FAILED, 0);
}

void rk_engine_fail_link(rk_engine *engine, uint32_t index, int32_t outcome) {
    for (uint32_t i = 0; i < engine->num_links; i++) {
        if (index != UINT32_MAX && i != index) continue;
        pthread_mutex_lock(&engine->links[i].lock);
        engine->links[i].failed = 1;
        pthread_mutex_unlock(&engine->links[i].lock);
    }
    pthread_rwlock_rdlock(&engine->keys_lock);
    rk_key *declared = engine->declared;
    pthread_rwlock_unlock(&engine->keys_lock);
    for (rk_key *key = declared; key; key = key->next_declared) {
        int uses = index == UINT32_MAX;
        for (uint32_t i = 0; i < key->nchunks && !uses; i++) uses = key->chunks[i].link == index;
        if (uses) cancel_pending(engine, key, outcome, index);
    }
}

/* ---- receiving --------------------------------------------------------------------- */
static rk_key *find_key(rk_engine *engine, uint64_t wire) {
    pthread_rwlock_rdlock(&engine->keys_lock);
    rk_key *found = rk_table_find(&engine->table, wire, 0);
    pthread_rwlock_unlock(&engine->keys_lock);
    return found;
}

static int drop_payload(rk_link *link, uint64_t length, int *err);

/* Read a result's payload into dst (NULL: drop it): from the stream, or, for a
 * shared one, from the place in the server's memory that the stream names; a
 * placed one is in dst already. */
static int read_payload(rk_link *link, const rk_header *h, char *dst, int *err) {
    if (h->shared & RK_PLACED) {  /* it crossed the wire all the same */
        atomic_fetch_add_explicit(&link->stream.received_bytes, h->length, memory_order_relaxed);
        return RK_OK;
    }
    if (!(h->shared & RK_SHARED_PAYLOAD)) {
        if (dst == NULL) return drop_payload(link, h->length, err);
        return rk_recv_all(&link->stream, dst, h->length, 0, err);
    }
    char place[RK_PLACE_SIZE];
    int rc = rk_recv_all(&link->stream, place, sizeof place, 0, err);
    if (rc) return rc;
    uint32_t number;
    uint64_t offset;
    memcpy(&number, place, 4);
    memcpy(&offset, place + 4, 8);
    const char *src = rk_segments_find(&link->segments, &link->stream, number, offset, h->length, &rc, err);
    if (src && dst) memcpy(dst, src, h->length);
    return rc;
}

/* Read and discard length bytes (a result that crossed its op's failure). */
static int drop_payload(rk_link *link, uint64_t length, int *err) {
    if (link->scratch_size < length) {
        char *grown = realloc(link->scratch, length);
        if (grown == NULL) return RK_ERR_NO_MEMORY;
        link->scratch = grown;
        link->scratch_size = length;
    }
    return rk_recv_all(&link->stream, link->scratch, length, 0, err);
}

/* A RESULT: into the caller's target, straight from the socket. */
static int take_result(rk_link *link, const rk_header *h, uint64_t *limit, int *err) {
    rk_key *key = find_key(link->engine, h->key);
    rk_chunk *chunk = NULL;
    rk_op *op = NULL;
    int failing = 0;              /* the op it answers is being failed */
    int from_host = (h->flags & RK_FLAG_VIA_HOST) != 0;   /* no bytes follow: they are in the host's sum */
    pthread_mutex_lock(&link->lock);
    if (key && h->chunk < key->nchunks && key->chunks[h->chunk].link == link->index) {
        chunk = &key->chunks[h->chunk];
        /* Only a push that has left can be answered: an early "result" is a broken peer's. */
        if (chunk->op && chunk->sent && chunk->op->round == h->round) {
            if ((h->shared & RK_PLACED) && !chunk->placed) {      /* written where we gave no place */
                pthread_mutex_unlock(&link->lock);
                return RK_ERR_SHARED;
            }
            int encoded = chunk->pulled && chunk->op->flags == 0;
            uint64_t expected = from_host ? 0 : encoded ? chunk->max_encoded : chunk->nbytes;
            if (from_host || !encoded ? h->length != expected
                                      : h->length > expected || (h->shared & RK_SHARED_PAYLOAD)) {
                *limit = expected;
                pthread_mutex_unlock(&link->lock);
                return RK_ERR_RESULT_LENGTH;
            }
            op = chunk->op;
            if (!busy_acquire(op)) {
                op = NULL;
                failing = 1;
            }
        }
    }
    /* A result to take from the host's sum: only for a local worker, of a push it sent that way. */
    if (from_host && !(link->engine->host_role == RK_HOST_MEMBER && chunk && link->via_host && chunk->host_sums[0] &&
                       h->length == 0 && (op == NULL || via_host(link, chunk, op)))) {
        pthread_mutex_unlock(&link->lock);
        if (op) busy_release(op);
        return RK_ERR_VIA_HOST;
    }
    if (op == NULL) {
        /* Taken in and dropped, no more than a chunk of the key: a result that
         * crossed its key's failure, or this link's, or its op's. */
        int dropped = key && (atomic_load(&key->failed) || link->failed || failing) && h->length <= key->max_chunk;
        pthread_mutex_unlock(&link->lock);
        if (!dropped) return RK_ERR_UNEXPECTED_RESULT;
        return from_host ? RK_OK : read_payload(link, h, NULL, err);
    }
    pthread_mutex_unlock(&link->lock);
    int rc;
    if (from_host) {
        rc = rdmakv_host_take(op->target + chunk->offset, chunk->host_sums[h->round % 2], chunk->nbytes, h->round,
                              link->engine->timeout, &link->stream.stop, &op->life, RK_CLAIMED);
        /* Stopped: closing here, or the op failed meanwhile (its failure says why). */
        if (rc == RDMAKV_SHM_STOPPED) {
            busy_release(op);
            return __atomic_load_n(&link->stream.stop, __ATOMIC_ACQUIRE) ? RK_STOPPED : RK_OK;
        }
        rc = rc ? RK_ERR_HOST_STALLED : RK_OK;
    } else if (chunk->pulled && op->flags == 0) {
        /* An encoded sum: into `pulled`, then decoded into the target. */
        rc = rk_recv_all(&link->stream, chunk->pulled, h->length, 0, err);
        if (rc == RK_OK) {
            float *target = (float *)(op->target + chunk->offset);
            memset(target, 0, chunk->nbytes);
            if (rk_codec_decode_add(&chunk->codec, chunk->pulled, h->length, target, chunk->nbytes / 4)) {
                *limit = chunk->max_encoded;
                rc = RK_ERR_RESULT_LENGTH;
            }
        }
    } else {
        rc = read_payload(link, h, op->target + chunk->offset, err);
        if (rc == RK_OK && link->engine->host_role == RK_HOST_ROOT && via_host(link, chunk, op))
            rdmakv_host_publish(chunk->host_sums[h->round % 2], op->target + chunk->offset, chunk->nbytes, h->round);
    }
    int cleared = 0;
    if (rc == RK_OK) {
        pthread_mutex_lock(&link->lock);
        if (chunk->op == op) {
            release_chunk(link, chunk);
            atomic_store(&chunk->rounds_done, h->round + 1);
            cleared = 1;
        }
        pthread_mutex_unlock(&link->lock);
    }
    if (cleared && atomic_fetch_sub(&op->remaining, 1) == 1 && claim(op)) {
        op->outcome = RK_DONE_OK;
        atomic_fetch_or(&op->life, RK_SETTLED);   /* still busy here: busy_release finishes it */
    }
    busy_release(op);
    return rc;
}

/* Shared memory: the server offers the round buffers of a chunk of ours for our
 * pushes to be added into (once per chunk). */
static int take_exposed_sums(rk_link *link, const rk_header *h, int *err) {
    char offer[RK_EXPOSED_SIZE];
    if (h->op != RK_OP_PUSH || h->length != RK_EXPOSED_SIZE) return RK_ERR_SHARED;
    int rc = rk_recv_all(&link->stream, offer, sizeof offer, 0, err);
    if (rc) return rc;
    rk_key *key = find_key(link->engine, h->key);
    if (!key || h->chunk >= key->nchunks || key->chunks[h->chunk].link != link->index) return RK_ERR_SHARED;
    rk_chunk *chunk = &key->chunks[h->chunk];
    uint64_t nbytes;
    memcpy(&nbytes, offer + 24, 8);
    if (nbytes != chunk->nbytes || atomic_load(&chunk->offered)) return RK_ERR_SHARED;
    for (int parity = 0; parity < 2; parity++) {
        uint32_t number;
        uint64_t offset;
        memcpy(&number, offer + 12 * parity, 4);
        memcpy(&offset, offer + 12 * parity + 4, 8);
        /* The sum's lock and round live in the control block just before it. */
        if (offset < RDMAKV_SUM_CONTROL || offset % RDMAKV_SUM_CONTROL) return RK_ERR_SHARED;
        chunk->sums[parity] = rk_segments_find(&link->segments, &link->stream, number, offset, nbytes, &rc, err);
        if (rc) return rc;
    }
    atomic_store_explicit(&chunk->offered, 1, memory_order_release);
    return RK_OK;
}

static void take_received(rk_link *link, const rk_header *h) {
    rk_key *key = find_key(link->engine, h->key);
    pthread_mutex_lock(&link->lock);
    if (key && h->chunk < key->nchunks && key->chunks[h->chunk].link == link->index) {
        rk_chunk *chunk = &key->chunks[h->chunk];
        if (chunk->op && chunk->sent && chunk->op->round == h->round) return_credit(link, chunk);
    }
    pthread_mutex_unlock(&link->lock);
}

/* Any other message: its payload (bounded) goes to the control plane. */
static int take_control(rk_link *link, const rk_header *h, uint64_t *limit, int *err) {
    uint64_t allowed = h->op == RK_OP_STATES ? atomic_load(&link->states_limit) : RK_MAX_CONTROL_BYTES;
    if (h->length > allowed) {
        *limit = allowed;
        return RK_ERR_TOO_LARGE;
    }
    rk_event *event = rk_event_new(link->index, RK_EVENT_MESSAGE, RK_OK, 0, h, 0);
    if (event == NULL) return RK_ERR_NO_MEMORY;
    if (h->length) {
        event->payload = malloc(h->length);
        int rc = event->payload ? rk_recv_all(&link->stream, event->payload, h->length, 0, err) : RK_ERR_NO_MEMORY;
        if (rc) {
            rk_event_free(event);
            return rc;
        }
    }
    return rk_mailbox_post_bounded(&link->engine->mailbox, event, &link->stream);
}

static void *reader_main(void *arg) {
    rk_link *link = arg;
    rk_header h;
    for (;;) {
        int err = 0, have_header = 0;
        uint64_t limit = 0;
        int rc = rk_read_header(&link->stream, &h, &have_header, &err);
        if (rc == RK_OK && h.shared) {
            /* Only these come with a transport's flags: anything else is a broken peer's. */
            if (h.shared == RK_EXPOSE)
                rc = take_exposed_sums(link, &h, &err);
            else if ((h.shared == RK_SHARED_PAYLOAD || h.shared == RK_PLACED) && h.op == RK_OP_RESULT && h.length)
                rc = take_result(link, &h, &limit, &err);
            else
                rc = RK_ERR_SHARED;
        } else if (rc == RK_OK) {
            switch (h.op) {
            case RK_OP_RESULT:
                rc = take_result(link, &h, &limit, &err);
                break;
            case RK_OP_RECEIVED:
            case RK_OP_HEARTBEAT:
                if (h.length) {
                    rc = RK_ERR_TOO_LARGE;
                    break;
                }
                if (h.op == RK_OP_RECEIVED) take_received(link, &h);
                break;
            default:
                rc = take_control(link, &h, &limit, &err);
            }
        }
        if (rc == RK_STOPPED || __atomic_load_n(&link->stream.stop, __ATOMIC_ACQUIRE)) return NULL;  /* closed here */
        if (rc != RK_OK) {
            post_error(link, RK_EVENT_CLOSED, rc, err, have_header ? &h : NULL, limit);
            return NULL;
        }
    }
}

/* ---- engine and keys ---------------------------------------------------------------- */
rk_engine *rk_engine_new(uint32_t num_links, uint64_t credit_bytes, uint64_t small_bytes, double timeout,
                         uint32_t sender_rank) {
    rk_engine *engine = calloc(1, sizeof *engine);
    if (engine == NULL) return NULL;
    engine->links = calloc(num_links ? num_links : 1, sizeof *engine->links);
    if (engine->links == NULL) {
        free(engine);
        return NULL;
    }
    engine->num_links = num_links;
    engine->credit_bytes = credit_bytes;
    engine->small_bytes = small_bytes;
    engine->timeout = timeout;
    engine->sender_rank = sender_rank;
    engine->pid = getpid();
    pthread_rwlock_init(&engine->keys_lock, NULL);
    pthread_mutex_init(&engine->order_lock, NULL);
    pthread_mutex_init(&engine->finished_lock, NULL);
    rk_mailbox_init(&engine->mailbox);
    for (uint32_t i = 0; i < num_links; i++) {
        rk_link *link = &engine->links[i];
        link->engine = engine;
        link->index = i;
        link->stream.fd = -1;
        link->stream.timeout = timeout;
        pthread_mutex_init(&link->lock, NULL);
        pthread_cond_init(&link->ready, NULL);
        pthread_mutex_init(&link->send_lock, NULL);
    }
    return engine;
}

int rk_engine_start_link(rk_engine *engine, uint32_t index, int fd, const rk_rings *rings, struct rk_verbs *verbs) {
    rk_link *link = &engine->links[index];
    int rc = rk_stream_open(&link->stream, fd, rings, verbs, engine->timeout);
    if (rc) return rc;
    rc = pthread_create(&link->reader, NULL, reader_main, link);
    if (rc) return rc;
    rc = pthread_create(&link->sender, NULL, sender_main, link);
    if (rc) {
        __atomic_store_n(&link->stream.stop, 1, __ATOMIC_RELEASE);
        rk_stream_wake(&link->stream);
        pthread_join(link->reader, NULL);
        return rc;
    }
    link->started = 1;
    return 0;
}

void rk_engine_close(rk_engine *engine) {
    if (engine->closed) return;   /* the descriptors may be another socket's by now */
    engine->closed = 1;
    if (getpid() != engine->pid) return;   /* a forked child: the threads and sockets are the parent's */
    for (uint32_t i = 0; i < engine->num_links; i++) {
        rk_link *link = &engine->links[i];
        pthread_mutex_lock(&link->lock);
        __atomic_store_n(&link->stream.stop, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&link->ready);
        pthread_mutex_unlock(&link->lock);
        rk_stream_wake(&link->stream);
    }
    for (uint32_t i = 0; i < engine->num_links; i++) {
        rk_link *link = &engine->links[i];
        if (link->started) {
            rk_join(link->sender);
            rk_join(link->reader);
            link->started = 0;
        }
        rk_stream_retire(&link->stream, &link->send_lock);
        /* The threads that read or add into the server's memory are gone (or are
         * this one, on its way out through a callback, done with it). */
        rk_segments_free(&link->segments);
    }
    rk_mailbox_close(&engine->mailbox);
}

void rk_engine_free(rk_engine *engine) {
    if (engine == NULL) return;
    rk_engine_close(engine);
    for (uint32_t i = 0; i < engine->num_links; i++) {
        rk_queue_free(&engine->links[i].queue);
        rk_stream_free(&engine->links[i].stream);
        free(engine->links[i].scratch);
    }
    rk_mailbox_free(&engine->mailbox);
    rk_key *key = engine->declared;
    while (key) {
        rk_key *next = key->next_declared;
        for (uint32_t i = 0; i < key->nchunks; i++) {
            rk_codec_state_free(&key->chunks[i].state);
            free(key->chunks[i].encoded);
            free(key->chunks[i].pulled);
        }
        free(key->chunks);
        free(key);
        key = next;
    }
    rk_table_free(&engine->table);
    free(engine->links);
    free(engine);
}

void rk_engine_set_spin(rk_engine *engine, double seconds) {
    engine->spin = seconds;
    for (uint32_t i = 0; i < engine->num_links; i++) engine->links[i].stream.spin = seconds;
}

void rk_link_wire_bytes(rk_engine *engine, uint32_t link, uint64_t out[2]) {
    rk_stream_wire_bytes(&engine->links[link].stream, out);
}

uint64_t rk_link_summed_bytes(rk_engine *engine, uint32_t link) {
    return atomic_load(&engine->links[link].summed_bytes);
}

void rk_link_allow_states(rk_engine *engine, uint32_t link, uint64_t limit) {
    atomic_store(&engine->links[link].states_limit, limit);
}

void rk_engine_set_host(rk_engine *engine, int role, uint32_t others, const uint8_t *via) {
    engine->host_role = role;
    engine->host_others = others;
    for (uint32_t i = 0; i < engine->num_links; i++) engine->links[i].via_host = role && via[i];
}

rk_key *rk_engine_add_key(rk_engine *engine, uint64_t wire, uint32_t order, uint8_t dtype, uint32_t nchunks,
                          const uint64_t *offsets, const uint64_t *sizes, const uint32_t *links,
                          char *const *host_sums) {
    rk_key *key = calloc(1, sizeof *key);
    if (key == NULL) return NULL;
    key->chunks = calloc(nchunks ? nchunks : 1, sizeof *key->chunks);
    if (key->chunks == NULL) {
        free(key);
        return NULL;
    }
    key->wire = wire;
    key->order = order;
    key->dtype = dtype;
    key->nchunks = nchunks;
    for (uint32_t i = 0; i < nchunks; i++) {
        key->chunks[i].offset = offsets[i];
        key->chunks[i].nbytes = sizes[i];
        key->chunks[i].link = links[i];
        if (host_sums) {
            key->chunks[i].host_sums[0] = host_sums[2 * i];
            key->chunks[i].host_sums[1] = host_sums[2 * i + 1];
        }
        if (sizes[i] > key->max_chunk) key->max_chunk = sizes[i];
    }
    pthread_rwlock_wrlock(&engine->keys_lock);
    int rc = rk_table_insert(&engine->table, wire, 0, key);
    if (rc == 0) {
        key->next_declared = engine->declared;
        engine->declared = key;
    }
    pthread_rwlock_unlock(&engine->keys_lock);
    if (rc) {
        free(key->chunks);
        free(key);
        return NULL;
    }
    return key;
}

int rk_engine_set_codec(rk_key *key, uint32_t index, const struct rk_codec *codec) {
    rk_chunk *chunk = &key->chunks[index];
    size_t count = chunk->nbytes / 4;
    chunk->codec = *codec;
    chunk->max_encoded = rk_codec_max_bytes(codec, count);
    if (rk_codec_state_init(codec, &chunk->state, count, index)) return -1;
    chunk->encoded = malloc(chunk->max_encoded ? chunk->max_encoded : 1);
    if (rk_codec_compresses_pull(codec)) chunk->pulled = malloc(chunk->max_encoded ? chunk->max_encoded : 1);
    if (chunk->encoded == NULL || (rk_codec_compresses_pull(codec) && chunk->pulled == NULL)) return -1;
    chunk->compressed = 1;
    return 0;
}
