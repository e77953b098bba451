/* A link's byte stream over an RC queue pair (verbs_stream.h). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE   /* POLLRDHUP in _shm.h */
#endif
#include "verbs_stream.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "wire.h"

#define POLL_BATCH 32
#define SPINS 200                 /* polls of the CQ before a leader arms it and sleeps */
#define SLICE_MS 100              /* how often a sleeper re-checks its deadline and flags */
#define WRITE_PIECE (256u * 1024) /* a send posts at least this often, so the peer starts reading */
#define GONE_GRACE 0.05           /* seconds to take in completions after the peer left */

static uint32_t load(_Atomic uint32_t *p) { return atomic_load_explicit(p, memory_order_acquire); }
static void store(_Atomic uint32_t *p, uint32_t v) { atomic_store_explicit(p, v, memory_order_release); }

static int slice(double left) {
    if (!(left < SLICE_MS / 1000.0)) return SLICE_MS;   /* also inf and NaN, before the cast */
    int ms = (int)(left * 1000.0) + 1;
    return ms > SLICE_MS ? SLICE_MS : ms;
}

static void fail(rk_verbs *v, uint32_t why) {
    uint32_t none = 0;
    atomic_compare_exchange_strong(&v->failure, &none, why);
}

static int post_receive(rk_verbs *v) {
    struct ibv_recv_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof(wr));     /* no scatter entry: only immediates arrive */
    return ibv_post_recv(v->qp, &wr, &bad);
}

int rk_verbs_open(rk_verbs *v) {
    pthread_mutex_init(&v->poll_lock, NULL);
    pthread_mutex_init(&v->send_lock, NULL);
    pthread_mutex_init(&v->credit_lock, NULL);
    v->wake_fd = -1;
    if (v->in_size == 0 || (v->in_size & (v->in_size - 1)) || v->out_size == 0 || (v->out_size & (v->out_size - 1)) ||
        v->send_depth <= RK_VERBS_CREDIT_SLOTS + 2)
        return EINVAL;
    atomic_init(&v->in_head, 0);
    atomic_init(&v->in_tail, 0);
    atomic_init(&v->in_credited, 0);
    atomic_init(&v->out_head, 0);
    atomic_init(&v->out_tail, 0);
    atomic_init(&v->send_free, v->send_depth);
    atomic_init(&v->failure, 0);
    atomic_init(&v->peer_gone, 0);
    atomic_init(&v->closing, 0);
    atomic_init(&v->progress, 0);
    atomic_init(&v->followers, 0);
    atomic_init(&v->copied_bytes, 0);
    atomic_init(&v->placed_bytes, 0);
    v->unacked_events = 0;
    v->armed = 0;
    v->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (v->wake_fd < 0) return errno;
    for (uint32_t i = 0; i < v->recv_depth; i++) {
        int rc = post_receive(v);
        if (rc) return rc;
    }
    return 0;
}

/* Take n send-queue entries if `keep` more stay free (a frame keeps RK_VERBS_CREDIT_SLOTS
 * for credits, a credit keeps none): 1 if taken. */
static int take_send_entries(rk_verbs *v, uint32_t n, uint32_t keep) {
    uint32_t free_now = load(&v->send_free);
    while (free_now >= n + keep) {
        if (atomic_compare_exchange_weak(&v->send_free, &free_now, free_now - n)) return 1;
    }
    return 0;
}

/* Tell the peer how far we read, once a quarter of our ring is free again
 * since it last heard.  Never waits: with another thread at it, or no send
 * entry free, a later call does it (a leader calls it before every sleep).
 * Under credit_lock, so credits are posted in the order of their tails. */
static void return_credit(rk_verbs *v) {
    if (load(&v->in_tail) - load(&v->in_credited) < v->in_size / 4) return;
    if (pthread_mutex_trylock(&v->credit_lock)) return;
    uint32_t tail = load(&v->in_tail);
    if (tail - load(&v->in_credited) < v->in_size / 4 || load(&v->failure) || load(&v->closing) ||
        !take_send_entries(v, 1, 0)) {
        pthread_mutex_unlock(&v->credit_lock);
        return;
    }
    store(&v->in_credited, tail);
    struct ibv_send_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof(wr));
    wr.wr_id = 1;                           /* entries it frees */
    wr.opcode = IBV_WR_SEND_WITH_IMM;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.imm_data = htonl(tail);
    int rc = ibv_post_send(v->qp, &wr, &bad);
    pthread_mutex_unlock(&v->credit_lock);
    if (rc) fail(v, RK_VERBS_FAILED_POST | ((uint32_t)rc << 8));
}

/* Take in what completed (the caller leads); how many completions, or -1 once failed. */
static int take_completions(rk_verbs *v) {
    struct ibv_wc wc[POLL_BATCH];
    int n = ibv_poll_cq(v->cq, POLL_BATCH, wc);
    if (n < 0) {
        fail(v, RK_VERBS_FAILED_POST | ((uint32_t)EIO << 8));
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (wc[i].status != IBV_WC_SUCCESS) {
            fail(v, RK_VERBS_FAILED_COMPLETION | ((uint32_t)wc[i].status << 8));
            continue;
        }
        if (wc[i].opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
            uint32_t head = ntohl(wc[i].imm_data), before = load(&v->in_head);
            if (head - load(&v->in_tail) > v->in_size || head - before > v->in_size) {
                fail(v, RK_VERBS_FAILED_CORRUPT);
                continue;
            }
            store(&v->in_head, head);
        } else if (wc[i].opcode == IBV_WC_RECV) {
            uint32_t tail = ntohl(wc[i].imm_data), before = load(&v->out_tail);
            int forward = tail - before <= v->out_size && load(&v->out_head) - tail <= v->out_size;
            int stale = !forward && before - tail <= v->out_size;     /* posted before a newer one: ignored */
            if (!(wc[i].wc_flags & IBV_WC_WITH_IMM) || wc[i].byte_len != 0 || !(forward || stale)) {
                fail(v, RK_VERBS_FAILED_CORRUPT);
                continue;
            }
            if (forward) store(&v->out_tail, tail);
        } else {
            atomic_fetch_add(&v->send_free, (uint32_t)wc[i].wr_id);
            continue;
        }
        int rc = post_receive(v);
        if (rc) fail(v, RK_VERBS_FAILED_POST | ((uint32_t)rc << 8));
    }
    if (n > 0) {
        return_credit(v);
        atomic_fetch_add(&v->progress, 1);
        if (load(&v->followers)) rdmakv_futex_wake(&v->progress);
    }
    return load(&v->failure) ? -1 : n;
}

static void take_events(rk_verbs *v) {
    struct ibv_cq *cq = NULL;
    void *context = NULL;
    while (v->get_cq_event(v->channel, &cq, &context) == 0) {
        v->armed = 0;
        if (++v->unacked_events >= 64) {
            v->ack_cq_events(v->cq, v->unacked_events);
            v->unacked_events = 0;
        }
    }
}

static void peer_left(rk_verbs *v) {
    char bye[16];
    ssize_t n = recv(v->side_fd, bye, sizeof(bye), MSG_DONTWAIT);
    if (n >= 0 || (errno != EAGAIN && errno != EINTR)) store(&v->peer_gone, 1);
}

typedef int (*ready_fn)(rk_verbs *v, uintptr_t arg);

static int has_bytes(rk_verbs *v, uintptr_t tail) { return load(&v->in_head) != (uint32_t)tail; }
static int has_room(rk_verbs *v, uintptr_t head) { return (uint32_t)head - load(&v->out_tail) < v->out_size; }
static int has_send_entries(rk_verbs *v, uintptr_t n) {
    return load(&v->send_free) >= (uint32_t)n + RK_VERBS_CREDIT_SLOTS;
}
static int drained(rk_verbs *v, uintptr_t unused) {
    (void)unused;
    return load(&v->send_free) == v->send_depth;
}

/* Lead for one round: take completions in, or sleep until one may have come.
 * Called holding poll_lock; returns with it released. */
static void lead(rk_verbs *v, int *spins, double spin_until, double deadline) {
    int n = take_completions(v);
    double now = rk_now();
    if (n != 0 || *spins < SPINS || (spin_until && now < spin_until)) {
        pthread_mutex_unlock(&v->poll_lock);
        if (n == 0) {
            ++*spins;
            if (*spins < SPINS) rdmakv_cpu_relax(); else sched_yield();
        }
        return;
    }
    return_credit(v);                       /* one that found the lock taken or no entry free */
    if (!v->armed) {
        if (ibv_req_notify_cq(v->cq, 0)) fail(v, RK_VERBS_FAILED_POST | ((uint32_t)EIO << 8));
        v->armed = 1;
        if (take_completions(v) != 0) {     /* what came before it was armed raises no event */
            pthread_mutex_unlock(&v->poll_lock);
            return;
        }
    }
    double left = deadline > 0 ? deadline - now : 1.0;
    if (left > 0) {
        struct pollfd fds[3] = {{.fd = v->channel->fd, .events = POLLIN},
                                {.fd = v->side_fd, .events = POLLIN},
                                {.fd = v->wake_fd, .events = POLLIN}};
        if (poll(fds, 3, slice(left)) > 0) {
            if (fds[0].revents) take_events(v);
            if (fds[1].revents) peer_left(v);
            if (fds[2].revents) {
                uint64_t count;
                if (read(v->wake_fd, &count, sizeof(count)) < 0) { /* already drained */ }
            }
        }
    }
    pthread_mutex_unlock(&v->poll_lock);
}

/* Wait until ready(v, arg), the stop flag, the end of the stream or the deadline
 * (0: none): RK_OK, RK_STOPPED, RK_ERR_EOF, RK_ERR_TIMEOUT, RK_ERR_IO or RK_ERR_CORRUPT. */
static int wait_loop(rk_verbs *v, rdmakv_flag *stop, ready_fn ready, uintptr_t arg, double deadline, double spin,
                     int *err, int *led) {
    int spins = 0;
    double spin_until = spin > 0 ? rk_now() + spin : 0, gone_since = 0;
    for (;;) {
        if (ready(v, arg)) return RK_OK;
        if (stop && atomic_load_explicit(stop, memory_order_acquire)) return RK_STOPPED;
        if (load(&v->closing)) return RK_ERR_EOF;
        uint32_t failure = load(&v->failure);
        if (failure) {
            if ((failure & 0xFF) == RK_VERBS_FAILED_CORRUPT) return RK_ERR_CORRUPT;
            *err = (failure & 0xFF) == RK_VERBS_FAILED_POST ? (int)(failure >> 8) : EIO;
            return RK_ERR_IO;
        }
        double now = rk_now();
        if (load(&v->peer_gone)) {
            /* Its last writes may complete here just after its side channel closed. */
            if (gone_since == 0) gone_since = now;
            else if (now - gone_since > GONE_GRACE) return RK_ERR_EOF;
        }
        if (deadline > 0 && now >= deadline) return RK_ERR_TIMEOUT;
        uint32_t seen = load(&v->progress);
        if (pthread_mutex_trylock(&v->poll_lock) == 0) {
            lead(v, &spins, spin_until, gone_since ? now + 0.001 : deadline);
            *led = 1;
            continue;
        }
        /* Counted first, then the lock tried again: a leader that let go before we were
         * counted has left it free, and one that holds it will see us when it leaves. */
        atomic_fetch_add(&v->followers, 1);
        if (pthread_mutex_trylock(&v->poll_lock) == 0) {
            pthread_mutex_unlock(&v->poll_lock);
        } else if (!ready(v, arg) && load(&v->progress) == seen) {
            rdmakv_futex_wait(&v->progress, seen, deadline > 0 ? slice(deadline - now) : SLICE_MS);
        }
        atomic_fetch_sub(&v->followers, 1);
    }
}

static int wait_for(rk_verbs *v, rdmakv_flag *stop, ready_fn ready, uintptr_t arg, double deadline, double spin,
                    int *err) {
    int led = 0;
    int rc = wait_loop(v, stop, ready, arg, deadline, spin, err, &led);
    if (led && load(&v->followers)) {       /* a leader leaving: one of them leads now */
        atomic_fetch_add(&v->progress, 1);
        rdmakv_futex_wake(&v->progress);
    }
    return rc;
}

void rk_verbs_wake(rk_verbs *v) {
    uint64_t one = 1;
    if (write(v->wake_fd, &one, sizeof(one)) < 0) { /* the counter is full: it is readable anyway */ }
    atomic_fetch_add(&v->progress, 1);
    rdmakv_futex_wake(&v->progress);
}

void rk_verbs_shut(rk_verbs *v) {
    store(&v->closing, 1);
    rk_verbs_wake(v);
}

int rk_verbs_drain(rk_verbs *v, double seconds) {
    double deadline = rk_now() + seconds;
    while (!drained(v, 0)) {
        if (load(&v->failure) || rk_now() >= deadline) return 0;
        if (pthread_mutex_trylock(&v->poll_lock) == 0) {
            take_completions(v);
            pthread_mutex_unlock(&v->poll_lock);
        }
        sched_yield();
    }
    return 1;
}

void rk_verbs_free(rk_verbs *v) {
    for (size_t i = 0; i < v->pinned.capacity; i++)
        if (v->pinned.slots[i].value) v->dereg_mr(v->pinned.slots[i].value);
    rk_table_free(&v->pinned);
    if (v->unacked_events) v->ack_cq_events(v->cq, v->unacked_events);
    v->unacked_events = 0;
    if (v->wake_fd >= 0) close(v->wake_fd);
    v->wake_fd = -1;
    pthread_mutex_destroy(&v->poll_lock);
    pthread_mutex_destroy(&v->send_lock);
    pthread_mutex_destroy(&v->credit_lock);
}

size_t rk_verbs_room(rk_verbs *v) {
    uint32_t used = load(&v->out_head) - load(&v->out_tail);
    return used > v->out_size ? 0 : v->out_size - used;
}

size_t rk_verbs_readable(rk_verbs *v) { return load(&v->in_head) - load(&v->in_tail); }

int rk_verbs_wait_readable(rk_verbs *v, rdmakv_flag *stop, double deadline, double spin, int *err) {
    return wait_for(v, stop, has_bytes, load(&v->in_tail), deadline, spin, err);
}

int rk_verbs_recv(rk_verbs *v, rdmakv_flag *stop, char *dst, size_t length, int at_start, double timeout, int *err) {
    uint32_t tail = load(&v->in_tail);
    while (length > 0) {
        uint32_t avail = load(&v->in_head) - tail;
        if (avail == 0) {
            int rc = wait_for(v, stop, has_bytes, tail, rk_now() + timeout, 0, err);
            if (rc == RK_ERR_EOF) return at_start ? RK_ERR_EOF : RK_ERR_MIDSTREAM;
            if (rc) return rc;
            continue;
        }
        size_t piece = avail < length ? avail : length;
        rdmakv_ring_copy_out(v->in_data, v->in_size, tail, dst, piece);
        atomic_fetch_add_explicit(&v->copied_bytes, piece, memory_order_relaxed);
        tail += (uint32_t)piece;
        dst += piece;
        length -= piece;
        at_start = 0;
        store(&v->in_tail, tail);
        return_credit(v);
    }
    return RK_OK;
}

/* Take `count` send-queue entries for a frame, waiting for completions to free them. */
static int take_frame_entries(rk_verbs *v, rdmakv_flag *stop, int count, double deadline, int *err) {
    while (!take_send_entries(v, (uint32_t)count, RK_VERBS_CREDIT_SLOTS)) {   /* a credit may take one first */
        int rc = wait_for(v, stop, has_send_entries, (uintptr_t)count, deadline, 0, err);
        if (rc) return rc;
    }
    return RK_OK;
}

/* RDMA-write the span [from, to) of the peer's ring, from the same place in
 * staging (src NULL) or from src (registered: lkey), the last write carrying
 * `to` as its immediate.  Under send_lock. */
static int post_span(rk_verbs *v, rdmakv_flag *stop, uint32_t from, uint32_t to, const char *src, uint32_t lkey,
                     double timeout, int *err) {
    uint32_t offset = from & (v->out_size - 1), length = to - from;
    uint32_t first = v->out_size - offset < length ? v->out_size - offset : length;
    int count = first < length ? 2 : 1;
    int rc = take_frame_entries(v, stop, count, rk_now() + timeout, err);
    if (rc) return rc;
    struct ibv_sge sge[2];
    struct ibv_send_wr wr[2], *bad = NULL;
    memset(wr, 0, sizeof(wr));
    uint32_t at[2] = {offset, 0}, len[2] = {first, length - first};
    for (int i = 0; i < count; i++) {
        sge[i].addr = src ? (uintptr_t)(src + (i ? first : 0)) : (uintptr_t)(v->out_data + at[i]);
        sge[i].length = len[i];
        sge[i].lkey = src ? lkey : v->out_lkey;
        wr[i].sg_list = &sge[i];
        wr[i].num_sge = 1;
        wr[i].opcode = IBV_WR_RDMA_WRITE;
        wr[i].wr.rdma.remote_addr = v->peer_addr + at[i];
        wr[i].wr.rdma.rkey = v->peer_rkey;
        if (len[i] <= v->max_inline) wr[i].send_flags = IBV_SEND_INLINE;
        if (i + 1 < count) wr[i].next = &wr[i + 1];
    }
    struct ibv_send_wr *last = &wr[count - 1];
    last->opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
    last->imm_data = htonl(to);
    last->send_flags |= IBV_SEND_SIGNALED;
    last->wr_id = (uint64_t)count;          /* entries its completion frees */
    store(&v->out_head, to);
    rc = ibv_post_send(v->qp, wr, &bad);
    if (rc) {
        fail(v, RK_VERBS_FAILED_POST | ((uint32_t)rc << 8));
        *err = rc;
        return RK_ERR_IO;
    }
    return RK_OK;
}

static int ended(rk_verbs *v) { return load(&v->closing) || load(&v->peer_gone) || load(&v->failure); }

/* A send that cannot go on fails as a socket's does. */
static int as_socket(int rc, int *err) {
    if (rc == RK_STOPPED || rc == RK_ERR_EOF) {
        *err = EPIPE;
        return RK_ERR_IO;
    }
    return rc;
}

int rk_verbs_send(rk_verbs *v, rdmakv_flag *stop, struct iovec *iov, const uint32_t *lkeys, int count,
                  double timeout, int *err) {
    int rc = RK_OK;
    pthread_mutex_lock(&v->send_lock);
    uint32_t head = load(&v->out_head), posted = head;
    for (int i = 0; i < count && rc == RK_OK; i++) {
        const char *src = iov[i].iov_base;
        size_t n = iov[i].iov_len;
        uint32_t lkey = lkeys ? lkeys[i] : 0;
        while (n > 0) {
            if (ended(v)) {
                *err = EPIPE;
                rc = RK_ERR_IO;
                break;
            }
            uint32_t used = head - load(&v->out_tail);
            size_t room = v->out_size - used;
            if (room == 0 || (lkey && posted != head)) {   /* staged bytes leave before a registered part */
                if (posted != head) {
                    rc = post_span(v, stop, posted, head, NULL, 0, timeout, err);
                    if (rc) break;
                    posted = head;
                }
                if (room == 0) rc = wait_for(v, stop, has_room, head, rk_now() + timeout, 0, err);
                if (rc) break;              /* an end of the stream is EPIPE, below */
                continue;
            }
            size_t piece = room < n ? room : n;
            if (piece > WRITE_PIECE) piece = WRITE_PIECE;
            if (lkey) {
                rc = post_span(v, stop, head, head + (uint32_t)piece, src, lkey, timeout, err);
                if (rc) break;
                posted = head + (uint32_t)piece;
                atomic_fetch_add_explicit(&v->placed_bytes, piece, memory_order_relaxed);
            } else {
                rdmakv_ring_copy_in(v->out_data, v->out_size, head, src, piece);
                atomic_fetch_add_explicit(&v->copied_bytes, piece, memory_order_relaxed);
            }
            head += (uint32_t)piece;
            src += piece;
            n -= piece;
            if (head - posted >= WRITE_PIECE) {
                rc = post_span(v, stop, posted, head, NULL, 0, timeout, err);
                if (rc) break;
                posted = head;
            }
        }
    }
    if (rc == RK_OK && posted != head) rc = post_span(v, stop, posted, head, NULL, 0, timeout, err);
    pthread_mutex_unlock(&v->send_lock);
    return as_socket(rc, err);
}

uint32_t rk_verbs_pin(rk_verbs *v, const void *addr, size_t length, int *err) {
    if (length == 0 || length > UINT32_MAX) {
        *err = EINVAL;
        return 0;
    }
    pthread_mutex_lock(&v->send_lock);
    struct ibv_mr *mr = rk_table_find(&v->pinned, (uintptr_t)addr, (uint32_t)length);
    if (mr == NULL) {
        mr = v->reg_mr(v->qp->pd, (void *)addr, length, 0);   /* only our NIC reads it */
        if (mr == NULL) {
            *err = errno;
        } else if (rk_table_insert(&v->pinned, (uintptr_t)addr, (uint32_t)length, mr)) {
            v->dereg_mr(mr);
            mr = NULL;
            *err = ENOMEM;
        }
    }
    pthread_mutex_unlock(&v->send_lock);
    return mr ? mr->lkey : 0;
}

int rk_verbs_place(rk_verbs *v, rdmakv_flag *stop, const void *src, size_t length, uint32_t lkey,
                   uint64_t remote_addr, uint32_t rkey, double timeout, int *err) {
    if (length == 0 || length > UINT32_MAX) {
        *err = EINVAL;
        return RK_ERR_IO;
    }
    pthread_mutex_lock(&v->send_lock);
    int rc = ended(v) ? RK_ERR_EOF : take_frame_entries(v, stop, 1, rk_now() + timeout, err);
    if (rc == RK_OK) {
        struct ibv_sge sge = {.addr = (uintptr_t)src, .length = (uint32_t)length, .lkey = lkey};
        struct ibv_send_wr wr, *bad = NULL;
        memset(&wr, 0, sizeof(wr));
        wr.wr_id = 1;
        wr.sg_list = &sge;
        wr.num_sge = 1;
        wr.opcode = IBV_WR_RDMA_WRITE;
        wr.send_flags = IBV_SEND_SIGNALED;
        wr.wr.rdma.remote_addr = remote_addr;
        wr.wr.rdma.rkey = rkey;
        int posted = ibv_post_send(v->qp, &wr, &bad);
        if (posted) {
            fail(v, RK_VERBS_FAILED_POST | ((uint32_t)posted << 8));
            *err = posted;
            rc = RK_ERR_IO;
        } else {
            atomic_fetch_add_explicit(&v->placed_bytes, length, memory_order_relaxed);
        }
    }
    pthread_mutex_unlock(&v->send_lock);
    return as_socket(rc, err);
}
