/* A single-producer/single-consumer byte ring in memory shared by two
 * processes: the shared-memory transport's data path.
 *
 * `head` counts bytes ever written (only the producer stores it), `tail` bytes
 * ever read (only the consumer stores it); both are 32-bit and wrap, so
 * head - tail (unsigned) is the fill level and the ring holds at most 2^31
 * bytes.  Publishing is a release store after the copy, observing an acquire
 * load before it.  A side about to sleep raises its `*_waiting` word and
 * re-checks (seq_cst on both sides, Dekker style), then sleeps in FUTEX_WAIT on
 * the counter it waits for; the other side wakes it only when that word is up,
 * so a busy stream makes no system calls.  Counters come from the other
 * process and are never trusted: a fill level above the size reports a
 * corrupt ring instead of touching memory outside it.  Sleeps are sliced, and
 * every slice re-checks the caller's stop conditions, so no wait is unbounded. */
#ifndef RDMAKV_SHM_H
#define RDMAKV_SHM_H
#include <errno.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RDMAKV_SHM_LINE 64
#define RDMAKV_SHM_CONTROL 4096   /* bytes before each ring's data: one page */

typedef struct {
    _Atomic uint32_t head;                       /* written by the producer */
    char pad0[RDMAKV_SHM_LINE - 4];
    _Atomic uint32_t tail;                       /* written by the consumer */
    char pad1[RDMAKV_SHM_LINE - 4];
    _Atomic uint32_t consumer_waiting;           /* the consumer sleeps on head */
    char pad2[RDMAKV_SHM_LINE - 4];
    _Atomic uint32_t producer_waiting;           /* the producer sleeps on tail */
    char pad3[RDMAKV_SHM_LINE - 4];
    _Atomic uint32_t closed;                     /* the producer will write no more */
    char pad4[RDMAKV_SHM_LINE - 4];
    _Atomic uint32_t consumer_gone;              /* the consumer will read no more */
} rdmakv_ring_ctl;

typedef _Atomic uint32_t rdmakv_flag;            /* a flag threads of one process share */

static inline uint32_t rdmakv_load_acquire(_Atomic uint32_t *p) {
    return atomic_load_explicit(p, memory_order_acquire);
}
static inline uint32_t rdmakv_load_relaxed(_Atomic uint32_t *p) {
    return atomic_load_explicit(p, memory_order_relaxed);
}
static inline void rdmakv_store_release(_Atomic uint32_t *p, uint32_t v) {
    atomic_store_explicit(p, v, memory_order_release);
}
static inline void rdmakv_store_seq(_Atomic uint32_t *p, uint32_t v) {
    atomic_store_explicit(p, v, memory_order_seq_cst);
}
static inline void rdmakv_fence(void) { atomic_thread_fence(memory_order_seq_cst); }

/* Sleep while *word == expected, at most `ms` milliseconds (shared, not
 * process-private: the waker is another process).  Returns 0 or -1/errno;
 * EAGAIN (the value already changed), EINTR and ETIMEDOUT are all normal. */
static inline int rdmakv_futex_wait(_Atomic uint32_t *word, uint32_t expected, int ms) {
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    return (int)syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, &ts, NULL, 0);
}
static inline void rdmakv_futex_wake(_Atomic uint32_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

/* The producer published up to `head`: wake the consumer if it sleeps. */
static inline void rdmakv_ring_publish(rdmakv_ring_ctl *c, uint32_t head) {
    rdmakv_store_release(&c->head, head);
    rdmakv_fence();
    if (atomic_load_explicit(&c->consumer_waiting, memory_order_relaxed))
        rdmakv_futex_wake(&c->head);
}

/* The consumer released up to `tail`: wake the producer if it sleeps. */
static inline void rdmakv_ring_release(rdmakv_ring_ctl *c, uint32_t tail) {
    rdmakv_store_release(&c->tail, tail);
    rdmakv_fence();
    if (atomic_load_explicit(&c->producer_waiting, memory_order_relaxed))
        rdmakv_futex_wake(&c->tail);
}

/* Copy n bytes into the ring at logical position pos (wrapping). */
static inline void rdmakv_ring_copy_in(char *data, uint32_t size, uint32_t pos, const char *src, size_t n) {
    uint32_t off = pos & (size - 1);
    size_t first = size - off;
    if (first > n) first = n;
    memcpy(data + off, src, first);
    if (n > first) memcpy(data, src + first, n - first);
}

/* Copy n bytes out of the ring from logical position pos (wrapping). */
static inline void rdmakv_ring_copy_out(const char *data, uint32_t size, uint32_t pos, char *dst, size_t n) {
    uint32_t off = pos & (size - 1);
    size_t first = size - off;
    if (first > n) first = n;
    memcpy(dst, data + off, first);
    if (n > first) memcpy(dst + first, data, n - first);
}

/* One bounded sleep of the consumer until head moves from `seen`. */
static inline void rdmakv_ring_sleep_consumer(rdmakv_ring_ctl *c, uint32_t seen, int ms) {
    rdmakv_store_seq(&c->consumer_waiting, 1);
    rdmakv_fence();
    if (atomic_load_explicit(&c->head, memory_order_seq_cst) == seen &&
        !atomic_load_explicit(&c->closed, memory_order_seq_cst))
        rdmakv_futex_wait(&c->head, seen, ms);
    rdmakv_store_seq(&c->consumer_waiting, 0);
}

/* One bounded sleep of the producer until tail moves from `seen`. */
static inline void rdmakv_ring_sleep_producer(rdmakv_ring_ctl *c, uint32_t seen, int ms) {
    rdmakv_store_seq(&c->producer_waiting, 1);
    rdmakv_fence();
    if (atomic_load_explicit(&c->tail, memory_order_seq_cst) == seen)
        rdmakv_futex_wait(&c->tail, seen, ms);
    rdmakv_store_seq(&c->producer_waiting, 0);
}

static inline void rdmakv_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}


/* ---- the loops, run with the GIL released --------------------------------- */
#include <poll.h>

enum {
    RDMAKV_SHM_SLICE_MS = 100,     /* how often a sleep re-checks its deadline and the peer */
    RDMAKV_SHM_SPINS = 256,        /* polls before sleeping: a wake-up costs two system calls */
    RDMAKV_SHM_PIECE = 256 * 1024, /* published in pieces so the reader copies out meanwhile */
};

enum {
    RDMAKV_SHM_TIMEOUT = -2,       /* no progress for the timeout */
    RDMAKV_SHM_GONE_MID = -3,      /* the peer left after part of the buffer */
    RDMAKV_SHM_GONE = -4,          /* the peer left (closed, or its process died) */
    RDMAKV_SHM_CORRUPT = -5,       /* counters that cannot be: a bug or a hostile peer */
    RDMAKV_SHM_STOPPED = -6,       /* closed locally */
};

typedef struct {
    rdmakv_ring_ctl *ctl;
    char *data;
    uint32_t size;                 /* a power of two <= 2^30 */
} rdmakv_ring;

static inline double rdmakv_shm_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The socket kept open beside the segment carries only the fds of shared
 * result memory after the set-up, so data waiting on it is no sign of
 * anything; its end (the peer's side closed: hang-up or error) means the
 * peer's process is gone. */
static inline int rdmakv_shm_peer_gone(int fd) {
    struct pollfd p;
    p.fd = fd;
    p.events = POLLRDHUP;
    p.revents = 0;
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

static inline int rdmakv_shm_slice(double deadline) {
    double left = deadline - rdmakv_shm_now();
    int ms;
    if (left <= 0) return 0;
    ms = (int)(left * 1000) + 1;
    return ms < RDMAKV_SHM_SLICE_MS ? ms : RDMAKV_SHM_SLICE_MS;
}

/* Copy the whole frame (a then b) in if it fits now; 1 when written, 0 when
 * there is no room yet (nothing written), or a negative code. */
static inline int rdmakv_ring_try_write2(rdmakv_ring *r, const char *a, size_t an, const char *b, size_t bn) {
    rdmakv_ring_ctl *c = r->ctl;
    uint32_t head = rdmakv_load_relaxed(&c->head);
    uint32_t used = head - rdmakv_load_acquire(&c->tail);
    if (used > r->size) return RDMAKV_SHM_CORRUPT;
    if (rdmakv_load_relaxed(&c->consumer_gone)) return RDMAKV_SHM_GONE;
    if ((size_t)(r->size - used) < an + bn) return 0;
    rdmakv_ring_copy_in(r->data, r->size, head, a, an);
    if (bn) rdmakv_ring_copy_in(r->data, r->size, head + (uint32_t)an, b, bn);
    rdmakv_ring_publish(c, head + (uint32_t)(an + bn));
    return 1;
}

/* Write n bytes, waiting for room; 0 or a negative code.  `timeout` bounds
 * each stretch without progress. */
static inline int rdmakv_ring_write(rdmakv_ring *r, const char *src, size_t n, double timeout,
                                    rdmakv_flag *stop, int fd) {
    rdmakv_ring_ctl *c = r->ctl;
    uint32_t head = rdmakv_load_relaxed(&c->head);
    double deadline = 0;
    int spins = 0, ms;
    while (n > 0) {
        uint32_t tail = rdmakv_load_acquire(&c->tail);
        uint32_t used = head - tail;
        size_t room;
        if (used > r->size) return RDMAKV_SHM_CORRUPT;
        if (atomic_load_explicit(stop, memory_order_relaxed)) return RDMAKV_SHM_STOPPED;
        if (rdmakv_load_relaxed(&c->consumer_gone)) return RDMAKV_SHM_GONE;
        room = r->size - used;
        if (room == 0) {
            if (spins < RDMAKV_SHM_SPINS) { spins++; rdmakv_cpu_relax(); continue; }
            if (rdmakv_shm_peer_gone(fd)) return RDMAKV_SHM_GONE;
            if (deadline == 0) deadline = rdmakv_shm_now() + timeout;
            ms = rdmakv_shm_slice(deadline);
            if (ms == 0) return RDMAKV_SHM_TIMEOUT;
            rdmakv_ring_sleep_producer(c, tail, ms);
            continue;
        }
        if (room > n) room = n;
        if (room > RDMAKV_SHM_PIECE) room = RDMAKV_SHM_PIECE;
        rdmakv_ring_copy_in(r->data, r->size, head, src, room);
        head += (uint32_t)room;
        src += room;
        n -= room;
        rdmakv_ring_publish(c, head);
        spins = 0;
        deadline = 0;
    }
    return 0;
}

/* Wait until the ring holds data: 1, or 0 after `timeout`, or a negative code
 * (RDMAKV_SHM_GONE once the peer left and everything it sent was read). */
static inline int rdmakv_ring_wait(rdmakv_ring *r, double timeout, rdmakv_flag *stop, int fd) {
    rdmakv_ring_ctl *c = r->ctl;
    uint32_t tail = rdmakv_load_relaxed(&c->tail);
    double deadline = 0;
    int spins = 0, ms;
    while (1) {
        uint32_t head = rdmakv_load_acquire(&c->head);
        if (head - tail > r->size) return RDMAKV_SHM_CORRUPT;
        if (head != tail) return 1;
        if (atomic_load_explicit(stop, memory_order_relaxed)) return RDMAKV_SHM_STOPPED;
        if (rdmakv_load_acquire(&c->closed) || (spins >= RDMAKV_SHM_SPINS && rdmakv_shm_peer_gone(fd))) {
            /* whatever it published before leaving is still to be read */
            if (rdmakv_load_acquire(&c->head) != tail) return 1;
            return RDMAKV_SHM_GONE;
        }
        if (spins < RDMAKV_SHM_SPINS) { spins++; rdmakv_cpu_relax(); continue; }
        if (deadline == 0) deadline = rdmakv_shm_now() + timeout;
        ms = rdmakv_shm_slice(deadline);
        if (ms == 0) return 0;
        rdmakv_ring_sleep_consumer(c, head, ms);
    }
}

/* Read n bytes into dst; 0 or a negative code.  `timeout` bounds each
 * stretch without progress. */
static inline int rdmakv_ring_read(rdmakv_ring *r, char *dst, size_t n, double timeout, rdmakv_flag *stop, int fd) {
    rdmakv_ring_ctl *c = r->ctl;
    uint32_t tail = rdmakv_load_relaxed(&c->tail);
    size_t wanted = n;
    int rc;
    while (n > 0) {
        uint32_t head = rdmakv_load_acquire(&c->head);
        size_t avail = head - tail;
        if (avail > r->size) return RDMAKV_SHM_CORRUPT;
        if (avail == 0) {
            rc = rdmakv_ring_wait(r, timeout, stop, fd);
            if (rc == 0) return RDMAKV_SHM_TIMEOUT;
            if (rc == RDMAKV_SHM_GONE && n < wanted) return RDMAKV_SHM_GONE_MID;
            if (rc < 0) return rc;
            continue;
        }
        if (avail > n) avail = n;
        if (avail > RDMAKV_SHM_PIECE) avail = RDMAKV_SHM_PIECE;
        rdmakv_ring_copy_out(r->data, r->size, tail, dst, avail);
        tail += (uint32_t)avail;
        dst += avail;
        n -= avail;
        rdmakv_ring_release(c, tail);
    }
    return 0;
}

/* Read all n bytes only if they are already there: 1 when read, 0 when not
 * (nothing read), or a negative code. */
static inline int rdmakv_ring_try_read(rdmakv_ring *r, char *dst, size_t n) {
    rdmakv_ring_ctl *c = r->ctl;
    uint32_t tail = rdmakv_load_relaxed(&c->tail);
    uint32_t avail = rdmakv_load_acquire(&c->head) - tail;
    if (avail > r->size) return RDMAKV_SHM_CORRUPT;
    if (avail < n) return 0;
    rdmakv_ring_copy_out(r->data, r->size, tail, dst, n);
    rdmakv_ring_release(c, tail + (uint32_t)n);
    return 1;
}

/* ---- sums several processes build in one shared buffer --------------------
 * The server's round buffers in shared memory carry this block in the 64
 * bytes before them.  Co-located workers add their pushes straight into the
 * buffer, and the server adds the pushes that reach it any other way: each
 * contributor takes the lock, copies its items in when `round` does not name
 * this round yet (the round's first contribution, which overwrites what two
 * rounds ago left) or adds them, marks the round, and unlocks.  The lock is
 * three-state (free, held, held with sleepers) so an uncontended hand-over
 * makes no system call; waiting is bounded like every other wait here. */
typedef struct {
    _Atomic uint32_t lock;          /* 0 free, 1 held, 2 held and someone sleeps */
    _Atomic uint32_t contributions; /* to `round` so far */
    _Atomic uint64_t round;         /* 1 + the round the buffer holds a sum of; 0: none yet */
    /* Host sums only (below): */
    _Atomic uint32_t bell;          /* bumped after each contribution: the local root sleeps on it */
    _Atomic uint32_t result;        /* 1 + the round (low 32 bits) whose result the buffer holds */
    _Atomic uint32_t sleepers;      /* processes asleep on bell or result: wake them */
} rdmakv_sum_ctl;

#define RDMAKV_SUM_CONTROL 64       /* bytes reserved before each shared sum buffer */

typedef void (*rdmakv_add_fn)(void *dst, const void *src, size_t count);   /* dst += src, count items */

static inline int rdmakv_sum_lock(rdmakv_sum_ctl *ctl, double timeout, rdmakv_flag *stop) {
    uint32_t expected = 0;
    double deadline = 0;
    int spins, ms;
    for (spins = 0; spins < RDMAKV_SHM_SPINS; spins++) {
        expected = 0;
        if (atomic_compare_exchange_weak_explicit(&ctl->lock, &expected, 1, memory_order_acquire,
                                                  memory_order_relaxed))
            return 0;
        rdmakv_cpu_relax();
    }
    while (atomic_exchange_explicit(&ctl->lock, 2, memory_order_acquire) != 0) {
        if (atomic_load_explicit(stop, memory_order_relaxed)) return RDMAKV_SHM_STOPPED;
        if (deadline == 0) deadline = rdmakv_shm_now() + timeout;
        ms = rdmakv_shm_slice(deadline);
        if (ms == 0) return RDMAKV_SHM_TIMEOUT;
        rdmakv_futex_wait(&ctl->lock, 2, ms);
    }
    return 0;
}

static inline void rdmakv_sum_unlock(rdmakv_sum_ctl *ctl) {
    if (atomic_exchange_explicit(&ctl->lock, 0, memory_order_release) == 2)
        rdmakv_futex_wake(&ctl->lock);
}

/* Contribute n bytes of src (whole items of `add`'s type) to round `round`'s
 * sum in dst, whose control block lies just before it: 0, or a negative code. */
static inline int rdmakv_sum_contribute(char *dst, const char *src, size_t n, rdmakv_add_fn add,
                                        size_t itemsize, uint64_t round, double timeout, rdmakv_flag *stop) {
    rdmakv_sum_ctl *ctl = (rdmakv_sum_ctl *)(dst - RDMAKV_SUM_CONTROL);
    int rc = rdmakv_sum_lock(ctl, timeout, stop);
    if (rc != 0) return rc;
    if (atomic_load_explicit(&ctl->round, memory_order_relaxed) != round + 1) {
        memcpy(dst, src, n);
        atomic_store_explicit(&ctl->round, round + 1, memory_order_relaxed);
        atomic_store_explicit(&ctl->contributions, 1, memory_order_relaxed);
    } else {
        add(dst, src, n / itemsize);
        atomic_fetch_add_explicit(&ctl->contributions, 1, memory_order_relaxed);
    }
    rdmakv_sum_unlock(ctl);
    return 0;
}

/* ---- host sums: one push per host -----------------------------------------
 * The workers of one host (kernel and network namespace) share a file of
 * these buffers, two per chunk (even, odd rounds), each after its control
 * block (rdmakv/worker/host_sums.py makes the file; worker_engine.c runs the
 * steps).  Round r of a chunk: every other local worker contributes its push
 * (rdmakv_host_contribute) and sends the server only the header; the local
 * root waits for all of them, adds its own (rdmakv_host_complete) and pushes
 * the buffer; once the server's result arrives it writes it into the same
 * buffer (rdmakv_host_publish), where the others copy it out
 * (rdmakv_host_take).  Reusing the buffer is safe for the reason round buffers
 * are (rdmakv/server/summing.py): nobody contributes round r + 2 before every
 * local worker has copied round r's result.  Every wait is bounded and gives
 * up when `stop` is set or `cancel` has a bit of `mask` (the op failed). */

static inline void rdmakv_host_ring(_Atomic uint32_t *word, rdmakv_sum_ctl *ctl) {
    rdmakv_fence();
    if (atomic_load_explicit(&ctl->sleepers, memory_order_seq_cst)) rdmakv_futex_wake(word);
}

/* Sleep at most one slice while *word == seen; RDMAKV_SHM_TIMEOUT past deadline. */
static inline int rdmakv_host_sleep(rdmakv_sum_ctl *ctl, _Atomic uint32_t *word, uint32_t seen, double deadline,
                                    rdmakv_flag *stop, _Atomic uint32_t *cancel, uint32_t mask) {
    if (atomic_load_explicit(stop, memory_order_relaxed) || (atomic_load(cancel) & mask)) return RDMAKV_SHM_STOPPED;
    int ms = rdmakv_shm_slice(deadline);
    if (ms == 0) return RDMAKV_SHM_TIMEOUT;
    atomic_fetch_add_explicit(&ctl->sleepers, 1, memory_order_seq_cst);
    if (atomic_load_explicit(word, memory_order_seq_cst) == seen) rdmakv_futex_wait(word, seen, ms);
    atomic_fetch_sub_explicit(&ctl->sleepers, 1, memory_order_seq_cst);
    return 0;
}

/* A local worker's push of round `round` into the host's sum. */
static inline int rdmakv_host_contribute(char *dst, const char *src, size_t n, rdmakv_add_fn add, size_t itemsize,
                                         uint64_t round, double timeout, rdmakv_flag *stop) {
    rdmakv_sum_ctl *ctl = (rdmakv_sum_ctl *)(dst - RDMAKV_SUM_CONTROL);
    int rc = rdmakv_sum_contribute(dst, src, n, add, itemsize, round, timeout, stop);
    if (rc) return rc;
    atomic_fetch_add_explicit(&ctl->bell, 1, memory_order_seq_cst);
    rdmakv_host_ring(&ctl->bell, ctl);
    return 0;
}

/* The local root: once `others` contributions to round `round` are in, add its
 * own; 0, or RDMAKV_SHM_TIMEOUT (a local worker stalled or died) or _STOPPED. */
static inline int rdmakv_host_complete(char *dst, const char *src, size_t n, rdmakv_add_fn add, size_t itemsize,
                                       uint64_t round, uint32_t others, double timeout, rdmakv_flag *stop,
                                       _Atomic uint32_t *cancel, uint32_t mask) {
    rdmakv_sum_ctl *ctl = (rdmakv_sum_ctl *)(dst - RDMAKV_SUM_CONTROL);
    double deadline = rdmakv_shm_now() + timeout;
    int spins = 0;
    for (;;) {
        uint32_t seen = atomic_load_explicit(&ctl->bell, memory_order_seq_cst);
        int rc = rdmakv_sum_lock(ctl, timeout, stop);
        if (rc) return rc;
        int ready = atomic_load_explicit(&ctl->round, memory_order_relaxed) == round + 1 &&
                    atomic_load_explicit(&ctl->contributions, memory_order_relaxed) >= others;
        if (ready) {
            add(dst, src, n / itemsize);
            atomic_fetch_add_explicit(&ctl->contributions, 1, memory_order_relaxed);
        }
        rdmakv_sum_unlock(ctl);
        if (ready) return 0;
        if (spins < RDMAKV_SHM_SPINS) {
            spins++;
            rdmakv_cpu_relax();
            continue;
        }
        rc = rdmakv_host_sleep(ctl, &ctl->bell, seen, deadline, stop, cancel, mask);
        if (rc) return rc;
    }
}

/* The local root: round `round`'s result, for the others to copy out. */
static inline void rdmakv_host_publish(char *dst, const char *result, size_t n, uint64_t round) {
    rdmakv_sum_ctl *ctl = (rdmakv_sum_ctl *)(dst - RDMAKV_SUM_CONTROL);
    memcpy(dst, result, n);
    atomic_store_explicit(&ctl->result, (uint32_t)(round + 1), memory_order_seq_cst);
    rdmakv_host_ring(&ctl->result, ctl);
}

/* A local worker: copy round `round`'s result out once the root published it. */
static inline int rdmakv_host_take(char *out, const char *src, size_t n, uint64_t round, double timeout,
                                   rdmakv_flag *stop, _Atomic uint32_t *cancel, uint32_t mask) {
    rdmakv_sum_ctl *ctl = (rdmakv_sum_ctl *)(src - RDMAKV_SUM_CONTROL);
    uint32_t want = (uint32_t)(round + 1);
    double deadline = rdmakv_shm_now() + timeout;
    int spins = 0;
    for (;;) {
        uint32_t seen = atomic_load_explicit(&ctl->result, memory_order_acquire);
        if (seen == want) {
            memcpy(out, src, n);
            return 0;
        }
        if (spins < RDMAKV_SHM_SPINS) {
            spins++;
            rdmakv_cpu_relax();
            continue;
        }
        int rc = rdmakv_host_sleep(ctl, &ctl->result, seen, deadline, stop, cancel, mask);
        if (rc) return rc;
    }
}

/* Counters start just below the 32-bit wrap, so every connection crosses it
 * within its first page of traffic: the wrap-around is exercised always, not
 * after 4 GiB.  Only the creator calls this, before the peer maps the segment. */
#define RDMAKV_SHM_START 0xFFFFF000u
static inline void rdmakv_ring_init(rdmakv_ring *r) {
    atomic_store_explicit(&r->ctl->head, RDMAKV_SHM_START, memory_order_relaxed);
    atomic_store_explicit(&r->ctl->tail, RDMAKV_SHM_START, memory_order_relaxed);
}

/* Bytes ready to read (capped at INT32_MAX by the size limit), or RDMAKV_SHM_CORRUPT. */
static inline int rdmakv_ring_avail(rdmakv_ring *r) {
    uint32_t avail = rdmakv_load_acquire(&r->ctl->head) - rdmakv_load_relaxed(&r->ctl->tail);
    return avail > r->size ? RDMAKV_SHM_CORRUPT : (int)avail;
}

/* Local close: tell the peer (no more data from us, no more reading by us)
 * and wake every thread of ours that sleeps on either ring. */
static inline void rdmakv_shm_shutdown(rdmakv_ring *out, rdmakv_ring *in, rdmakv_flag *stop) {
    atomic_store_explicit(stop, 1, memory_order_seq_cst);
    rdmakv_store_seq(&out->ctl->closed, 1);
    rdmakv_store_seq(&in->ctl->consumer_gone, 1);
    rdmakv_futex_wake(&out->ctl->head);   /* the peer's reader */
    rdmakv_futex_wake(&out->ctl->tail);   /* our writer */
    rdmakv_futex_wake(&in->ctl->head);    /* our reader */
    rdmakv_futex_wake(&in->ctl->tail);    /* the peer's writer */
}

#endif
