/* The worker's native data plane (engine.h): the per-message path of a
 * pushpull, with no Python object touched.  Locks, from outer to inner:
 * order_lock (a key's rounds), then one link's lock (its queue, credit and the
 * results it owes), then its send_lock (the socket's byte stream).  keys_lock
 * (the wire -> key table) is never held with another.  No lock is held while
 * an op finishes: finishing may call into Python (rk_done_fn takes the GIL). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "engine.h"

#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the wire header is little-endian and is copied as is"
#endif

/* rdmakv/protocol.py; tests/test_engine.py checks that these agree. */
#define RK_MAGIC 0x564B4452u
#define RK_VERSION 1
#define RK_OP_PUSH 12
#define RK_OP_RESULT 13
#define RK_OP_STATES 17
#define RK_OP_RECEIVED 20
#define RK_OP_HEARTBEAT 31
#define RK_FLAG_NO_DATA 2u
#define RK_FLAG_ACK 4u
#define RK_KNOWN_FLAGS 7u
#define RK_MAX_DTYPE 7
#define RK_MAX_CONTROL_BYTES (1u << 20)

#define RK_STOPPED (-1)           /* a wait ended because the link is closing here */
#define RK_SLICE_MS 100           /* how often a wait re-checks its deadline and the stop flag */
#define RK_CLAIMED 0x80000000u    /* rk_op.life: one thread settles the outcome */
#define RK_SETTLED 0x40000000u    /* rk_op.life: the outcome is written */
#define RK_BUSY_MASK 0x3fffffffu  /* rk_op.life: threads touching the op's buffers */

typedef struct {
    uint64_t offset;
    uint64_t nbytes;
    uint32_t link;
    rk_op *op;                    /* whose result the link owes for this chunk (link lock) */
    int credited;                 /* that op's push holds credit until RECEIVED or RESULT */
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

typedef struct {
    int32_t priority;
    uint32_t order;
    uint32_t chunk;
    uint64_t arrival;
    uint64_t credit;
    rk_op *op;
} rk_item;

struct rk_link {
    rk_engine *engine;
    uint32_t index;
    int fd;
    int started;
    pthread_t reader, sender;
    pthread_mutex_t lock;
    pthread_cond_t ready;
    rk_item *heap;
    size_t heap_count, heap_capacity;
    uint64_t arrivals;
    uint64_t in_flight;           /* credited bytes sent whose RECEIVED or RESULT is not back */
    uint32_t credited_chunks;
    int sending;                  /* a thread is sending a queued chunk */
    int stop;
    int failed;                   /* set by the control plane: start nothing new here */
    int send_failed;              /* reported once */
    pthread_mutex_t send_lock;
    _Atomic uint64_t states_limit;
    char *scratch;                /* where dropped results land (the reader's) */
    size_t scratch_size;
};

struct rk_engine {
    uint32_t num_links;
    rk_link *links;
    uint64_t credit_bytes;
    uint64_t direct_bytes;
    double timeout;
    uint32_t sender_rank;
    pthread_rwlock_t keys_lock;
    rk_key **table;               /* open addressing on the wire key */
    size_t table_capacity, table_count;
    rk_key *declared;
    pthread_mutex_t order_lock;
    pthread_mutex_t finished_lock;
    rk_op *finished;
    pthread_mutex_t mailbox_lock;
    pthread_cond_t mailbox_ready;
    rk_event *mail_head, *mail_tail;
    int closing;
    int closed;                   /* rk_engine_close ran: the links' descriptors are the caller's again */
};

/* ---- time, futex, socket loops ------------------------------------------------ */
static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int slice_ms(double left) {
    int ms = (int)(left * 1000.0) + 1;
    return ms > RK_SLICE_MS ? RK_SLICE_MS : ms;
}

/* 0 once fd is ready for events, RK_STOPPED, RK_ERR_TIMEOUT after the deadline (0: none), RK_ERR_IO. */
static int wait_fd(rk_link *link, short events, double deadline, int *err) {
    struct pollfd pfd = {.fd = link->fd, .events = events};
    for (;;) {
        if (__atomic_load_n(&link->stop, __ATOMIC_ACQUIRE)) return RK_STOPPED;
        double left = deadline > 0 ? deadline - now_seconds() : 1.0;
        if (left <= 0) return RK_ERR_TIMEOUT;
        pfd.revents = 0;
        int rc = poll(&pfd, 1, slice_ms(left));
        if (rc > 0) return 0;
        if (rc < 0 && errno != EINTR) {
            *err = errno;
            return RK_ERR_IO;
        }
    }
}

/* Fill dst; RK_OK, RK_ERR_EOF (closed before the first byte when at_start),
 * RK_ERR_MIDSTREAM, RK_ERR_TIMEOUT (no progress for the timeout), RK_ERR_IO, RK_STOPPED. */
static int recv_all(rk_link *link, char *dst, size_t length, int at_start, int *err) {
    double deadline = now_seconds() + link->engine->timeout;
    while (length > 0) {
        ssize_t n = recv(link->fd, dst, length, MSG_DONTWAIT);
        if (n > 0) {
            at_start = 0;
            dst += n;
            length -= (size_t)n;
            deadline = now_seconds() + link->engine->timeout;
        } else if (n == 0) {
            return at_start ? RK_ERR_EOF : RK_ERR_MIDSTREAM;
        } else if (errno == EAGAIN) {
            int rc = wait_fd(link, POLLIN, deadline, err);
            if (rc) return rc;
        } else if (errno != EINTR) {
            *err = errno;
            return (errno == ECONNRESET && at_start) ? RK_ERR_EOF : RK_ERR_IO;
        }
    }
    return RK_OK;
}

/* Write every byte of iov (the caller holds send_lock); RK_OK, RK_ERR_TIMEOUT, RK_ERR_IO. */
static int send_all(rk_link *link, struct iovec *iov, int count, int *err) {
    double deadline = now_seconds() + link->engine->timeout;
    while (count > 0) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)count};
        ssize_t n = sendmsg(link->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0) {
            size_t sent = (size_t)n;
            while (count > 0 && sent >= iov->iov_len) {
                sent -= iov->iov_len;
                iov++;
                count--;
            }
            if (count > 0) {
                iov->iov_base = (char *)iov->iov_base + sent;
                iov->iov_len -= sent;
            }
            deadline = now_seconds() + link->engine->timeout;
        } else if (errno == EAGAIN) {
            struct pollfd pfd = {.fd = link->fd, .events = POLLOUT};
            double left = deadline - now_seconds();
            if (left <= 0) return RK_ERR_TIMEOUT;
            if (poll(&pfd, 1, slice_ms(left)) < 0 && errno != EINTR) {
                *err = errno;
                return RK_ERR_IO;
            }
        } else if (errno != EINTR) {
            *err = errno;
            return RK_ERR_IO;
        }
    }
    return RK_OK;
}

static void futex_wait(_Atomic uint32_t *word, uint32_t expected, int ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, &ts, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

/* ---- header ------------------------------------------------------------------------ */
void rk_header_pack(char *out, const rk_header *h) {
    memcpy(out + 0, &h->magic, 4);
    memcpy(out + 4, &h->version, 2);
    memcpy(out + 6, &h->op, 1);
    memcpy(out + 7, &h->dtype, 1);
    memcpy(out + 8, &h->flags, 4);
    memcpy(out + 12, &h->key, 8);
    memcpy(out + 20, &h->chunk, 4);
    memcpy(out + 24, &h->priority, 4);
    memcpy(out + 28, &h->round, 8);
    memcpy(out + 36, &h->length, 8);
    memcpy(out + 44, &h->sender, 4);
}

void rk_header_unpack(const char *in, rk_header *h) {
    memcpy(&h->magic, in + 0, 4);
    memcpy(&h->version, in + 4, 2);
    memcpy(&h->op, in + 6, 1);
    memcpy(&h->dtype, in + 7, 1);
    memcpy(&h->flags, in + 8, 4);
    memcpy(&h->key, in + 12, 8);
    memcpy(&h->chunk, in + 20, 4);
    memcpy(&h->priority, in + 24, 4);
    memcpy(&h->round, in + 28, 8);
    memcpy(&h->length, in + 36, 8);
    memcpy(&h->sender, in + 44, 4);
}

static int known_op(uint8_t op) {
    return (op >= 1 && op <= 6) || (op >= 10 && op <= 21) || op == 30 || op == 31 || (op >= 40 && op <= 42);
}

int rk_header_check(const rk_header *h) {
    if (h->magic != RK_MAGIC) return RK_ERR_BAD_MAGIC;
    if (h->version != RK_VERSION) return RK_ERR_BAD_VERSION;
    if (!known_op(h->op)) return RK_ERR_BAD_OP;
    if (h->flags & ~RK_KNOWN_FLAGS) return RK_ERR_BAD_FLAGS;
    if (h->dtype > RK_MAX_DTYPE) return RK_ERR_BAD_DTYPE;
    return RK_OK;
}

/* ---- mailbox ------------------------------------------------------------------------- */
static void post(rk_engine *engine, rk_event *event) {
    pthread_mutex_lock(&engine->mailbox_lock);
    if (engine->mail_tail) engine->mail_tail->next = event;
    else engine->mail_head = event;
    engine->mail_tail = event;
    pthread_cond_signal(&engine->mailbox_ready);
    pthread_mutex_unlock(&engine->mailbox_lock);
}

static void post_error(rk_link *link, uint32_t kind, int error, int sys_errno, const rk_header *h, uint64_t limit) {
    rk_event *event = calloc(1, sizeof *event);
    if (event == NULL) return;    /* the link still stops; the control plane sees it closed */
    event->link = link->index;
    event->kind = kind;
    event->error = error;
    event->sys_errno = sys_errno;
    event->limit = limit;
    if (h) event->header = *h;
    post(link->engine, event);
}

rk_event *rk_engine_next_event(rk_engine *engine, double timeout) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);   /* pthread_cond_timedwait's clock */
    until.tv_sec += (time_t)timeout;
    until.tv_nsec += (long)((timeout - (double)(time_t)timeout) * 1e9);
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&engine->mailbox_lock);
    while (engine->mail_head == NULL && !engine->closing)
        if (pthread_cond_timedwait(&engine->mailbox_ready, &engine->mailbox_lock, &until) == ETIMEDOUT) break;
    rk_event *event = engine->mail_head;
    if (event) {
        engine->mail_head = event->next;
        if (engine->mail_head == NULL) engine->mail_tail = NULL;
        event->next = NULL;
    }
    pthread_mutex_unlock(&engine->mailbox_lock);
    return event;
}

void rk_event_free(rk_event *event) {
    if (event) {
        free(event->payload);
        free(event);
    }
}

/* ---- operations: settling and finishing -------------------------------------------- */
static void start(rk_op *op);

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
    int call = op->has_callbacks;
    pthread_mutex_unlock(&op->callback_lock);
    if (call && op->on_done) op->on_done(op);
    /* Pairs with rk_op_wait: each side writes its word, then reads the other's (seq_cst). */
    atomic_store(&op->done, 1);
    if (atomic_load(&op->waiters)) futex_wake(&op->done);
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

static void heap_remove_op(rk_link *link, rk_op *op);

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
        if (chunk->op == op) {
            chunk->op = NULL;
            return_credit(link, chunk);
        }
        heap_remove_op(link, op);
        pthread_mutex_unlock(&link->lock);
    }
    publish(op);
}

/* ---- the send queue: a binary heap, highest priority, then key order, chunk, arrival ---- */
static int item_before(const rk_item *a, const rk_item *b) {
    if (a->priority != b->priority) return a->priority > b->priority;
    if (a->order != b->order) return a->order < b->order;
    if (a->chunk != b->chunk) return a->chunk < b->chunk;
    return a->arrival < b->arrival;
}

static void heap_sift_up(rk_item *heap, size_t i) {
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!item_before(&heap[i], &heap[parent])) break;
        rk_item swap = heap[i];
        heap[i] = heap[parent];
        heap[parent] = swap;
        i = parent;
    }
}

static void heap_sift_down(rk_item *heap, size_t count, size_t i) {
    for (;;) {
        size_t best = i, left = 2 * i + 1, right = left + 1;
        if (left < count && item_before(&heap[left], &heap[best])) best = left;
        if (right < count && item_before(&heap[right], &heap[best])) best = right;
        if (best == i) return;
        rk_item swap = heap[i];
        heap[i] = heap[best];
        heap[best] = swap;
        i = best;
    }
}

static int heap_push(rk_link *link, const rk_item *item) {
    if (link->heap_count == link->heap_capacity) {
        size_t capacity = link->heap_capacity ? 2 * link->heap_capacity : 64;
        rk_item *grown = realloc(link->heap, capacity * sizeof *grown);
        if (grown == NULL) return -1;
        link->heap = grown;
        link->heap_capacity = capacity;
    }
    link->heap[link->heap_count] = *item;
    heap_sift_up(link->heap, link->heap_count++);
    return 0;
}

/* The next chunk that may go (the caller holds link->lock): credit permitting; a
 * chunk larger than the whole credit still goes when nothing else is in flight. */
static int heap_pop_ready(rk_link *link, rk_item *out) {
    if (link->heap_count == 0) return 0;
    uint64_t credit = link->heap[0].credit;
    uint64_t limit = link->engine->credit_bytes;
    if (limit && credit && link->credited_chunks && link->in_flight + credit > limit) return 0;
    *out = link->heap[0];
    link->heap[0] = link->heap[--link->heap_count];
    heap_sift_down(link->heap, link->heap_count, 0);
    if (credit) {
        rk_chunk *chunk = &out->op->key->chunks[out->chunk];
        chunk->credited = 1;
        link->in_flight += credit;
        link->credited_chunks++;
    }
    return 1;
}

static void heap_remove_op(rk_link *link, rk_op *op) {
    size_t kept = 0;
    for (size_t i = 0; i < link->heap_count; i++)
        if (link->heap[i].op != op) link->heap[kept++] = link->heap[i];
    if (kept == link->heap_count) return;
    link->heap_count = kept;
    for (size_t i = kept / 2 + 1; i-- > 0;) heap_sift_down(link->heap, kept, i);
}

/* ---- sending ---------------------------------------------------------------------- */
static void report_send_failure(rk_link *link, int error, int sys_errno) {
    pthread_mutex_lock(&link->lock);
    int first = !link->send_failed;
    link->send_failed = 1;
    pthread_mutex_unlock(&link->lock);
    if (first) post_error(link, RK_EVENT_SEND_FAILED, error, sys_errno, NULL, 0);
}

/* Send one popped chunk, then let the next sender in (the caller set link->sending). */
static void transmit(rk_link *link, const rk_item *item) {
    rk_op *op = item->op;
    if (busy_acquire(op)) {
        rk_key *key = op->key;
        rk_chunk *chunk = &key->chunks[item->chunk];
        int no_data = (op->flags & RK_FLAG_NO_DATA) != 0;
        rk_header h = {.magic = RK_MAGIC, .version = RK_VERSION, .op = RK_OP_PUSH, .dtype = key->dtype,
                       .flags = op->flags | (item->credit ? RK_FLAG_ACK : 0), .key = key->wire,
                       .chunk = item->chunk, .priority = op->priority, .round = op->round,
                       .length = no_data ? 0 : chunk->nbytes, .sender = link->engine->sender_rank};
        char packed[RK_HEADER_SIZE];
        rk_header_pack(packed, &h);
        struct iovec iov[2] = {{packed, RK_HEADER_SIZE}, {(char *)op->source + chunk->offset, h.length}};
        int err = 0;
        pthread_mutex_lock(&link->send_lock);
        int rc = send_all(link, iov, h.length ? 2 : 1, &err);
        pthread_mutex_unlock(&link->send_lock);
        busy_release(op);
        if (rc) report_send_failure(link, rc, err);
    }
    pthread_mutex_lock(&link->lock);
    link->sending = 0;
    if (link->heap_count) pthread_cond_signal(&link->ready);
    pthread_mutex_unlock(&link->lock);
}

static void *sender_main(void *arg) {
    rk_link *link = arg;
    rk_item item;
    pthread_mutex_lock(&link->lock);
    for (;;) {
        while (!link->stop && (link->sending || !heap_pop_ready(link, &item)))
            pthread_cond_wait(&link->ready, &link->lock);
        if (link->stop) break;
        link->sending = 1;
        pthread_mutex_unlock(&link->lock);
        transmit(link, &item);
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
    int rc = send_all(link, iov, length ? 2 : 1, err);
    pthread_mutex_unlock(&link->send_lock);
    return rc;
}

/* ---- starting an op: its chunks go to their links' queues -------------------------- */
static void start(rk_op *op) {
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
        rk_item item = {.priority = op->priority, .order = key->order, .chunk = i, .op = op,
                        .credit = (chunk->nbytes > engine->direct_bytes && engine->credit_bytes) ? chunk->nbytes : 0};
        int direct = 0;
        pthread_mutex_lock(&link->lock);
        if (link->failed || atomic_load(&op->life) & RK_CLAIMED) {
            uint32_t failed = link->index;
            int link_failed = link->failed;
            pthread_mutex_unlock(&link->lock);
            if (link_failed) cancel(op, RK_DONE_LINK_FAILED, failed);
            return;
        }
        item.arrival = link->arrivals++;
        chunk->op = op;
        chunk->credited = 0;
        if (heap_push(link, &item)) {
            chunk->op = NULL;
            pthread_mutex_unlock(&link->lock);
            cancel(op, RK_DONE_CANCELLED, 0);
            return;
        }
        /* A small chunk with nothing ahead of it goes from this thread: a hand-off
         * to the sender thread costs more than the send. */
        if (!link->sending && link->heap_count == 1 && chunk->nbytes <= engine->direct_bytes &&
            heap_pop_ready(link, &item)) {
            link->sending = 1;
            direct = 1;
        } else {
            pthread_cond_signal(&link->ready);
        }
        pthread_mutex_unlock(&link->lock);
        if (direct) transmit(link, &item);
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
    double deadline = now_seconds() + timeout;
    atomic_fetch_add(&op->waiters, 1);
    while (!atomic_load(&op->done)) {
        double left = deadline - now_seconds();
        if (left <= 0) break;
        futex_wait(&op->done, 0, slice_ms(left));
    }
    atomic_fetch_sub(&op->waiters, 1);
    return (int)atomic_load(&op->done);
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
static rk_op *take_pending(rk_engine *engine, rk_key *key) {
    pthread_mutex_lock(&engine->order_lock);
    rk_op *list = key->waiting_head;
    key->waiting_head = key->waiting_tail = NULL;
    if (key->active) {
        key->active->next = list;
        list = key->active;
    }
    pthread_mutex_unlock(&engine->order_lock);
    return list;
}

static void cancel_list(rk_op *list, int32_t outcome, uint32_t failed_link) {
    while (list) {
        rk_op *next = list->next;   /* finishing reuses next */
        cancel(list, outcome, failed_link);
        list = next;
    }
}

void rk_engine_fail_key(rk_engine *engine, rk_key *key) {
    atomic_store(&key->failed, 1);
    cancel_list(take_pending(engine, key), RK_DONE_KEY_FAILED, 0);
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
        if (uses) cancel_list(take_pending(engine, key), outcome, index);
    }
}

/* ---- receiving --------------------------------------------------------------------- */
static rk_key *find_key(rk_engine *engine, uint64_t wire) {
    pthread_rwlock_rdlock(&engine->keys_lock);
    rk_key *found = NULL;
    if (engine->table_capacity) {
        size_t mask = engine->table_capacity - 1;
        for (size_t i = (size_t)(wire * 0x9E3779B97F4A7C15ull) & mask; engine->table[i]; i = (i + 1) & mask)
            if (engine->table[i]->wire == wire) {
                found = engine->table[i];
                break;
            }
    }
    pthread_rwlock_unlock(&engine->keys_lock);
    return found;
}

/* Read and discard length bytes (a result that crossed its op's failure). */
static int drop_payload(rk_link *link, uint64_t length, int *err) {
    if (link->scratch_size < length) {
        char *grown = realloc(link->scratch, length);
        if (grown == NULL) return RK_ERR_NO_MEMORY;
        link->scratch = grown;
        link->scratch_size = length;
    }
    return recv_all(link, link->scratch, length, 0, err);
}

/* A RESULT: into the caller's target, straight from the socket. */
static int take_result(rk_link *link, const rk_header *h, uint64_t *limit, int *err) {
    rk_key *key = find_key(link->engine, h->key);
    rk_chunk *chunk = NULL;
    rk_op *op = NULL;
    int dropped = 0;
    pthread_mutex_lock(&link->lock);
    if (key && h->chunk < key->nchunks && key->chunks[h->chunk].link == link->index) {
        chunk = &key->chunks[h->chunk];
        if (chunk->op && chunk->op->round == h->round) {
            if (h->length != chunk->nbytes) {
                *limit = chunk->nbytes;
                pthread_mutex_unlock(&link->lock);
                return RK_ERR_RESULT_LENGTH;
            }
            op = chunk->op;
            if (!busy_acquire(op)) op = NULL;
        }
    }
    if (op == NULL) {
        /* Taken in and dropped, no more than a chunk of the key: a result that
         * crossed its key's failure, or this link's, or its op's. */
        dropped = key && (atomic_load(&key->failed) || link->failed || (chunk && chunk->op)) &&
                  h->length <= key->max_chunk;
        pthread_mutex_unlock(&link->lock);
        if (!dropped) return RK_ERR_UNEXPECTED_RESULT;
        return drop_payload(link, h->length, err);
    }
    pthread_mutex_unlock(&link->lock);
    int rc = recv_all(link, op->target + chunk->offset, h->length, 0, err);
    int cleared = 0;
    if (rc == RK_OK) {
        pthread_mutex_lock(&link->lock);
        if (chunk->op == op) {
            chunk->op = NULL;
            return_credit(link, chunk);
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

static void take_received(rk_link *link, const rk_header *h) {
    rk_key *key = find_key(link->engine, h->key);
    pthread_mutex_lock(&link->lock);
    if (key && h->chunk < key->nchunks && key->chunks[h->chunk].link == link->index) {
        rk_chunk *chunk = &key->chunks[h->chunk];
        if (chunk->op && chunk->op->round == h->round) return_credit(link, chunk);
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
    rk_event *event = calloc(1, sizeof *event);
    if (event == NULL) return RK_ERR_NO_MEMORY;
    event->link = link->index;
    event->kind = RK_EVENT_MESSAGE;
    event->header = *h;
    if (h->length) {
        event->payload = malloc(h->length);
        int rc = event->payload ? recv_all(link, event->payload, h->length, 0, err) : RK_ERR_NO_MEMORY;
        if (rc) {
            rk_event_free(event);
            return rc;
        }
    }
    post(link->engine, event);
    return RK_OK;
}

static void *reader_main(void *arg) {
    rk_link *link = arg;
    char packed[RK_HEADER_SIZE];
    rk_header h;
    for (;;) {
        int err = 0;
        uint64_t limit = 0;
        int rc = wait_fd(link, POLLIN, 0, &err);
        int have_header = 0;
        if (rc == RK_OK) rc = recv_all(link, packed, RK_HEADER_SIZE, 1, &err);
        if (rc == RK_OK) {
            rk_header_unpack(packed, &h);
            have_header = 1;
            rc = rk_header_check(&h);
        }
        if (rc == RK_OK) {
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
        if (rc == RK_STOPPED || __atomic_load_n(&link->stop, __ATOMIC_ACQUIRE)) return NULL;   /* closed here */
        if (rc != RK_OK) {
            post_error(link, RK_EVENT_CLOSED, rc, err, have_header ? &h : NULL, limit);
            return NULL;
        }
    }
}

/* ---- engine and keys ---------------------------------------------------------------- */
rk_engine *rk_engine_new(uint32_t num_links, uint64_t credit_bytes, uint64_t direct_bytes, double timeout,
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
    engine->direct_bytes = direct_bytes;
    engine->timeout = timeout;
    engine->sender_rank = sender_rank;
    pthread_rwlock_init(&engine->keys_lock, NULL);
    pthread_mutex_init(&engine->order_lock, NULL);
    pthread_mutex_init(&engine->finished_lock, NULL);
    pthread_mutex_init(&engine->mailbox_lock, NULL);
    pthread_cond_init(&engine->mailbox_ready, NULL);
    for (uint32_t i = 0; i < num_links; i++) {
        rk_link *link = &engine->links[i];
        link->engine = engine;
        link->index = i;
        link->fd = -1;
        pthread_mutex_init(&link->lock, NULL);
        pthread_cond_init(&link->ready, NULL);
        pthread_mutex_init(&link->send_lock, NULL);
    }
    return engine;
}

int rk_engine_start_link(rk_engine *engine, uint32_t index, int fd) {
    rk_link *link = &engine->links[index];
    link->fd = fd;
    int rc = pthread_create(&link->reader, NULL, reader_main, link);
    if (rc) return rc;
    rc = pthread_create(&link->sender, NULL, sender_main, link);
    if (rc) {
        __atomic_store_n(&link->stop, 1, __ATOMIC_RELEASE);
        shutdown(fd, SHUT_RDWR);
        pthread_join(link->reader, NULL);
        return rc;
    }
    link->started = 1;
    return 0;
}

void rk_engine_close(rk_engine *engine) {
    if (engine->closed) return;   /* the descriptors may be another socket's by now */
    engine->closed = 1;
    for (uint32_t i = 0; i < engine->num_links; i++) {
        rk_link *link = &engine->links[i];
        pthread_mutex_lock(&link->lock);
        __atomic_store_n(&link->stop, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&link->ready);
        pthread_mutex_unlock(&link->lock);
        if (link->fd >= 0) shutdown(link->fd, SHUT_RDWR);   /* wakes a reader or sender in poll */
    }
    for (uint32_t i = 0; i < engine->num_links; i++) {
        rk_link *link = &engine->links[i];
        if (link->started) {
            pthread_join(link->sender, NULL);
            pthread_join(link->reader, NULL);
            link->started = 0;
        }
    }
    pthread_mutex_lock(&engine->mailbox_lock);
    engine->closing = 1;
    pthread_cond_broadcast(&engine->mailbox_ready);
    pthread_mutex_unlock(&engine->mailbox_lock);
}

void rk_engine_free(rk_engine *engine) {
    if (engine == NULL) return;
    rk_engine_close(engine);
    for (uint32_t i = 0; i < engine->num_links; i++) {
        free(engine->links[i].heap);
        free(engine->links[i].scratch);
    }
    rk_event *event = engine->mail_head;
    while (event) {
        rk_event *next = event->next;
        rk_event_free(event);
        event = next;
    }
    rk_key *key = engine->declared;
    while (key) {
        rk_key *next = key->next_declared;
        free(key->chunks);
        free(key);
        key = next;
    }
    free(engine->table);
    free(engine->links);
    free(engine);
}

void rk_link_allow_states(rk_engine *engine, uint32_t link, uint64_t limit) {
    atomic_store(&engine->links[link].states_limit, limit);
}

static int table_insert(rk_engine *engine, rk_key *key) {   /* the caller holds keys_lock for writing */
    if (2 * (engine->table_count + 1) > engine->table_capacity) {
        size_t capacity = engine->table_capacity ? 2 * engine->table_capacity : 64;
        rk_key **table = calloc(capacity, sizeof *table);
        if (table == NULL) return -1;
        for (size_t i = 0; i < engine->table_capacity; i++) {
            rk_key *old = engine->table[i];
            if (old == NULL) continue;
            size_t j = (size_t)(old->wire * 0x9E3779B97F4A7C15ull) & (capacity - 1);
            while (table[j]) j = (j + 1) & (capacity - 1);
            table[j] = old;
        }
        free(engine->table);
        engine->table = table;
        engine->table_capacity = capacity;
    }
    size_t mask = engine->table_capacity - 1;
    size_t j = (size_t)(key->wire * 0x9E3779B97F4A7C15ull) & mask;
    while (engine->table[j]) j = (j + 1) & mask;
    engine->table[j] = key;
    engine->table_count++;
    return 0;
}

rk_key *rk_engine_add_key(rk_engine *engine, uint64_t wire, uint32_t order, uint8_t dtype, uint32_t nchunks,
                          const uint64_t *offsets, const uint64_t *sizes, const uint32_t *links) {
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
        if (sizes[i] > key->max_chunk) key->max_chunk = sizes[i];
    }
    pthread_rwlock_wrlock(&engine->keys_lock);
    int rc = table_insert(engine, key);
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
