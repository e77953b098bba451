/* wire.h: the header, the stream, memory files, the mailbox, the table and the send queue. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "wire.h"
#include "verbs_stream.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "_reduce.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the wire header is little-endian and is copied as is"
#endif

#define SLICE_MS 100              /* how often a wait re-checks its deadline and the stop flag */

double rk_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int slice_ms(double left) {
    if (!(left < SLICE_MS / 1000.0)) return SLICE_MS;   /* also inf and NaN, before the cast */
    int ms = (int)(left * 1000.0) + 1;
    return ms > SLICE_MS ? SLICE_MS : ms;
}

/* One step of a spin: the CPU's pause while in the first half of the budget,
 * then sched_yield, so a spinner on a busy machine lets the others run. */
static void relax_or_yield(double left, double budget) {
    if (left > budget / 2) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ __volatile__("yield");
#endif
    } else {
        sched_yield();
    }
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

/* ---- the stream ---------------------------------------------------------------------- */
int rk_wait_fd(rk_stream *s, short events, double deadline, int *err) {
    struct pollfd pfd = {.fd = s->fd, .events = events};
    for (;;) {
        if (__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) return RK_STOPPED;
        double left = deadline > 0 ? deadline - rk_now() : 1.0;
        if (left <= 0) return RK_ERR_TIMEOUT;
        pfd.revents = 0;
        int rc = poll(&pfd, 1, slice_ms(left));
        if (rc > 0) return RK_OK;
        if (rc < 0 && errno != EINTR) {
            *err = errno;
            return RK_ERR_IO;
        }
    }
}

int rk_stream_open(rk_stream *s, int fd, const rk_rings *rings, struct rk_verbs *verbs, double timeout) {
    s->has_rings = rings != NULL;
    s->verbs = verbs;
    if (rings) {
        s->rings = *rings;
    } else if (!verbs) {
        s->in = malloc(RK_READ_BUFFER);
        if (s->in == NULL) return ENOMEM;
    }
    s->fd = fd;
    s->timeout = timeout;
    s->in_start = s->in_end = 0;
    atomic_init(&s->sent_bytes, 0);
    atomic_init(&s->received_bytes, 0);
    return 0;
}

void rk_stream_wire_bytes(rk_stream *s, uint64_t out[2]) {
    out[0] = atomic_load_explicit(&s->sent_bytes, memory_order_relaxed);
    out[1] = atomic_load_explicit(&s->received_bytes, memory_order_relaxed);
}

int rk_stream_buffered(const rk_stream *s) { return s->has_rings || s->verbs != NULL; }

size_t rk_stream_room(rk_stream *s) {
    if (s->verbs) return s->fd < 0 ? 0 : rk_verbs_room(s->verbs);
    if (!s->has_rings || s->fd < 0) return 0;
    uint32_t used = rdmakv_load_relaxed(&s->rings.out.ctl->head) - rdmakv_load_acquire(&s->rings.out.ctl->tail);
    return used > s->rings.out.size ? 0 : s->rings.out.size - used;
}

void rk_stream_wake(rk_stream *s) {
    if (s->fd < 0) return;
    if (s->verbs) {
        rk_verbs_wake(s->verbs);
    } else if (s->has_rings) {
        rdmakv_futex_wake(&s->rings.in.ctl->head);    /* our reader */
        rdmakv_futex_wake(&s->rings.out.ctl->tail);   /* our sender */
    } else {
        shutdown(s->fd, SHUT_RDWR);                   /* wakes a reader or sender in poll */
    }
}

void rk_stream_free(rk_stream *s) {
    free(s->in);
    s->in = NULL;
}

void rk_stream_retire(rk_stream *s, pthread_mutex_t *send_lock) {
    pthread_mutex_lock(send_lock);
    s->fd = -1;
    pthread_mutex_unlock(send_lock);
}

void rk_join(pthread_t thread) {
    if (!pthread_equal(pthread_self(), thread)) pthread_join(thread, NULL);
}

size_t rk_stream_take_buffered(rk_stream *s, char *dst, size_t n) {
    if (s->has_rings || s->verbs) return 0;   /* nothing is read ahead of a ring */
    size_t have = s->in_end - s->in_start;
    if (n > have) n = have;
    memcpy(dst, s->in + s->in_start, n);
    s->in_start += n;
    return n;
}

/* One non-blocking recv into the read-ahead buffer, which its callers have
 * emptied: bytes read, 0 at end of stream, -1 with errno. */
static ssize_t refill(rk_stream *s) {
    s->in_start = s->in_end = 0;
    RK_OBSERVED(s);
    ssize_t n = recv(s->fd, s->in, RK_READ_BUFFER, MSG_DONTWAIT);
    if (n > 0) s->in_end = (size_t)n;
    return n;
}

/* ---- the stream over shared-memory rings ------------------------------------------ */
static int ring_stopped(rk_stream *s) {
    return __atomic_load_n(&s->stop, __ATOMIC_ACQUIRE) != 0;
}

static int ring_shut(rk_stream *s) {   /* the channel's owner shut it: like a socket shut down here */
    return atomic_load_explicit(s->rings.closing, memory_order_acquire) != 0;
}

/* Wait until the in-ring holds data past tail: RK_OK; RK_STOPPED; RK_ERR_EOF when the
 * peer is gone, or the channel was shut here, with nothing left to read; or
 * RK_ERR_TIMEOUT at the deadline (0: none).  Polls for `spin` seconds (and a
 * few hundred pauses at least) before sleeping on the ring's futex. */
static int ring_wait(rk_stream *s, uint32_t tail, double deadline, double spin) {
    rdmakv_ring *r = &s->rings.in;
    rdmakv_ring_ctl *c = r->ctl;
    double spin_until = spin > 0 ? rk_now() + spin : 0;
    int spins = 0;
    for (;;) {
        uint32_t head = rdmakv_load_acquire(&c->head);
        if (head - tail > r->size) return RK_ERR_CORRUPT;
        if (head != tail) return RK_OK;
        if (ring_stopped(s)) return RK_STOPPED;
        if (ring_shut(s)) return RK_ERR_EOF;
        if (rdmakv_load_acquire(&c->closed)) break;
        if (spins < RDMAKV_SHM_SPINS) {
            spins++;
            rdmakv_cpu_relax();
            continue;
        }
        double now = rk_now();
        if (spin_until && now < spin_until) {
            relax_or_yield(spin_until - now, spin);
            continue;
        }
        double left = deadline > 0 ? deadline - now : 1.0;
        if (left <= 0) return RK_ERR_TIMEOUT;
        if (rdmakv_shm_peer_gone(s->fd)) break;    /* a system call: only before sleeping */
        rdmakv_ring_sleep_consumer(c, head, slice_ms(left));
    }
    /* The peer is gone; what it published before leaving is still to be read. */
    return rdmakv_load_acquire(&c->head) != tail ? RK_OK : RK_ERR_EOF;
}

static int ring_recv(rk_stream *s, char *dst, size_t length, int at_start) {
    rdmakv_ring *r = &s->rings.in;
    rdmakv_ring_ctl *c = r->ctl;
    uint32_t tail = rdmakv_load_relaxed(&c->tail);
    while (length > 0) {
        uint32_t avail = rdmakv_load_acquire(&c->head) - tail;
        if (avail > r->size) return RK_ERR_CORRUPT;
        if (avail == 0) {
            int rc = ring_wait(s, tail, rk_now() + s->timeout, 0);
            if (rc == RK_ERR_EOF) return at_start ? RK_ERR_EOF : RK_ERR_MIDSTREAM;
            if (rc) return rc;
            continue;
        }
        RK_OBSERVED(s);
        size_t piece = avail < length ? avail : length;
        if (piece > RDMAKV_SHM_PIECE) piece = RDMAKV_SHM_PIECE;   /* the sender refills meanwhile */
        rdmakv_ring_copy_out(r->data, r->size, tail, dst, piece);
        tail += (uint32_t)piece;
        dst += piece;
        length -= piece;
        at_start = 0;
        rdmakv_ring_release(c, tail);
    }
    return RK_OK;
}

/* Copy iov into the out-ring, publishing once at the end (one wake-up for a batch)
 * and whenever a piece is large or the ring is full (so the reader drains it). */
static int ring_send(rk_stream *s, struct iovec *iov, int count, int *err) {
    rdmakv_ring *r = &s->rings.out;
    rdmakv_ring_ctl *c = r->ctl;
    uint32_t head = rdmakv_load_relaxed(&c->head), published = head;
    double deadline = 0;
    int spins = 0;
    for (int i = 0; i < count; i++) {
        const char *src = iov[i].iov_base;
        size_t n = iov[i].iov_len;
        while (n > 0) {
            uint32_t tail = rdmakv_load_acquire(&c->tail);
            uint32_t used = head - tail;
            if (used > r->size) return RK_ERR_CORRUPT;
            if (ring_stopped(s) || ring_shut(s) || rdmakv_load_relaxed(&c->consumer_gone)) {
                *err = EPIPE;
                return RK_ERR_IO;
            }
            size_t room = r->size - used;
            if (room == 0) {
                if (published != head) {
                    RK_PUBLISHED(s);
                    rdmakv_ring_publish(c, published = head);
                }
                if (spins < RDMAKV_SHM_SPINS) {
                    spins++;
                    rdmakv_cpu_relax();
                    continue;
                }
                if (rdmakv_shm_peer_gone(s->fd)) {
                    *err = EPIPE;
                    return RK_ERR_IO;
                }
                double now = rk_now();
                if (deadline == 0) deadline = now + s->timeout;
                if (now >= deadline) return RK_ERR_TIMEOUT;
                rdmakv_ring_sleep_producer(c, tail, slice_ms(deadline - now));
                continue;
            }
            size_t piece = room < n ? room : n;
            if (piece > RDMAKV_SHM_PIECE) piece = RDMAKV_SHM_PIECE;
            rdmakv_ring_copy_in(r->data, r->size, head, src, piece);
            head += (uint32_t)piece;
            src += piece;
            n -= piece;
            spins = 0;
            deadline = 0;
            if (head - published >= RDMAKV_SHM_PIECE) {
                RK_PUBLISHED(s);
                rdmakv_ring_publish(c, published = head);
            }
        }
    }
    if (published != head) {
        RK_PUBLISHED(s);
        rdmakv_ring_publish(c, head);
    }
    return RK_OK;
}

static int recv_all(rk_stream *s, char *dst, size_t length, int at_start, int *err);

int rk_recv_all(rk_stream *s, char *dst, size_t length, int at_start, int *err) {
    int rc = recv_all(s, dst, length, at_start, err);
    if (rc == RK_OK) atomic_fetch_add_explicit(&s->received_bytes, length, memory_order_relaxed);
    return rc;
}

static int recv_all(rk_stream *s, char *dst, size_t length, int at_start, int *err) {
    if (s->verbs) return rk_verbs_recv(s->verbs, &s->stop, dst, length, at_start, s->timeout, err);
    if (s->has_rings) return ring_recv(s, dst, length, at_start);
    size_t taken = rk_stream_take_buffered(s, dst, length);
    dst += taken;
    length -= taken;
    if (taken) at_start = 0;
    double deadline = rk_now() + s->timeout;
    while (length > 0) {
        int direct = length >= RK_DIRECT_READ;   /* the buffer is empty here: what it held went first */
        if (direct) RK_OBSERVED(s);
        ssize_t n = direct ? recv(s->fd, dst, length, MSG_DONTWAIT) : refill(s);
        if (n > 0) {
            at_start = 0;
            if (!direct) n = (ssize_t)rk_stream_take_buffered(s, dst, length);
            dst += n;
            length -= (size_t)n;
            deadline = rk_now() + s->timeout;
        } else if (n == 0) {
            return at_start ? RK_ERR_EOF : RK_ERR_MIDSTREAM;
        } else if (errno == EAGAIN) {
            int rc = rk_wait_fd(s, POLLIN, deadline, err);
            if (rc) return rc;
        } else if (errno != EINTR) {
            *err = errno;
            return (errno == ECONNRESET && at_start) ? RK_ERR_EOF : RK_ERR_IO;
        }
    }
    return RK_OK;
}

static int send_all(rk_stream *s, struct iovec *iov, const uint32_t *lkeys, int count, int *err);

int rk_send_all(rk_stream *s, struct iovec *iov, int count, int *err) {
    return rk_send_registered(s, iov, NULL, count, err);
}

int rk_send_registered(rk_stream *s, struct iovec *iov, const uint32_t *lkeys, int count, int *err) {
    size_t total = 0;
    for (int i = 0; i < count; i++) total += iov[i].iov_len;
    int rc = send_all(s, iov, lkeys, count, err);
    if (rc == RK_OK) atomic_fetch_add_explicit(&s->sent_bytes, total, memory_order_relaxed);
    return rc;
}

static int send_all(rk_stream *s, struct iovec *iov, const uint32_t *lkeys, int count, int *err) {
    if (s->fd < 0) {              /* closed here */
        *err = EBADF;
        return RK_ERR_IO;
    }
    if (s->verbs) return rk_verbs_send(s->verbs, &s->stop, iov, lkeys, count, s->timeout, err);
    if (s->has_rings) return ring_send(s, iov, count, err);
    double deadline = rk_now() + s->timeout;
    while (count > 0) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)count};
        RK_SENDING(s, iov, count);
        ssize_t n = sendmsg(s->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        RK_SENT();
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
            deadline = rk_now() + s->timeout;
        } else if (errno == EAGAIN) {
            struct pollfd pfd = {.fd = s->fd, .events = POLLOUT};
            double left = deadline - rk_now();
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

int rk_read_header(rk_stream *s, rk_header *h, int *have_header, int *err) {
    char packed[RK_HEADER_SIZE];
    *have_header = 0;
    /* Between messages a link may be idle for as long as it likes: wait (in
     * slices that watch the stop flag) only for a header's first byte.  A busy
     * link's next message often comes within microseconds: polling for it for
     * `spin` seconds first saves the sleep and the wake-up. */
    if (s->verbs) {
        int rc = rk_verbs_wait_readable(s->verbs, &s->stop, 0, s->spin, err);
        if (rc) return rc;
        rc = rk_recv_all(s, packed, RK_HEADER_SIZE, 1, err);
        if (rc != RK_OK) return rc;
        rk_header_unpack(packed, h);
        *have_header = 1;
        h->shared = h->flags & RK_VERBS_FLAGS;
        h->flags &= ~RK_VERBS_FLAGS;
        return rk_header_check(h);
    }
    if (s->has_rings) {
        int rc = ring_wait(s, rdmakv_load_relaxed(&s->rings.in.ctl->tail), 0, s->spin);
        if (rc) return rc;
        rc = rk_recv_all(s, packed, RK_HEADER_SIZE, 1, err);
        if (rc != RK_OK) return rc;
        rk_header_unpack(packed, h);
        *have_header = 1;
        h->shared = h->flags & RK_SHARED_FLAGS;
        h->flags &= ~RK_SHARED_FLAGS;
        return rk_header_check(h);
    }
    double spin_until = s->spin > 0 ? rk_now() + s->spin : 0;
    while (s->in_start == s->in_end) {
        ssize_t n = refill(s);
        if (n > 0) break;
        if (n == 0) return RK_ERR_EOF;
        if (errno == EAGAIN) {
            if (spin_until && rk_now() < spin_until && !__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
                relax_or_yield(spin_until - rk_now(), s->spin);
                continue;
            }
            int rc = rk_wait_fd(s, POLLIN, 0, err);
            if (rc) return rc;
        } else if (errno != EINTR) {
            *err = errno;
            return errno == ECONNRESET ? RK_ERR_EOF : RK_ERR_IO;
        }
    }
    int rc = rk_recv_all(s, packed, RK_HEADER_SIZE, 0, err);
    if (rc != RK_OK) return rc;
    rk_header_unpack(packed, h);
    *have_header = 1;
    h->shared = 0;
    return rk_header_check(h);
}

/* ---- the peer's memory files (shared memory) ------------------------------------------ */
/* Take one memory file the peer sent on the Unix socket: map it as its number. */
static int take_segment(rk_segments *m, rk_stream *s, double deadline, int *err) {
    char data[RK_SEGMENT_NOTICE_SIZE];
    union {
        char bytes[CMSG_SPACE(sizeof(int))];
        struct cmsghdr aligned;
    } control;
    struct iovec iov = {data, sizeof data};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes,
                         .msg_controllen = sizeof control.bytes};
    ssize_t n;
    for (;;) {
        n = recvmsg(s->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n >= 0 || (errno != EAGAIN && errno != EINTR)) break;
        int rc = rk_wait_fd(s, POLLIN, deadline, err);
        if (rc == RK_ERR_TIMEOUT) return RK_ERR_SHARED;   /* a frame named a file never sent */
        if (rc) return rc;
    }
    if (n < 0) {
        *err = errno;
        return RK_ERR_IO;
    }
    int fd = -1;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS && cm->cmsg_len == CMSG_LEN(sizeof(int)))
        memcpy(&fd, CMSG_DATA(cm), sizeof fd);
    if (n == 0 && fd < 0) return RK_ERR_MIDSTREAM;
    uint32_t number;
    uint64_t size;
    memcpy(&number, data, 4);
    memcpy(&size, data + 4, 8);
    struct stat st;
    int rc = RK_ERR_SHARED;
    int seals = fd >= 0 ? fcntl(fd, F_GET_SEALS) : -1;   /* -1 for a file that cannot be sealed */
    if (fd >= 0 && n == RK_SEGMENT_NOTICE_SIZE && !(msg.msg_flags & MSG_CTRUNC) && number < RK_MAX_SEGMENTS &&
        m->base[number] == NULL && size && fstat(fd, &st) == 0 && (uint64_t)st.st_size == size &&
        seals >= 0 && (seals & F_SEAL_SHRINK)) {
        void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base != MAP_FAILED) {
            m->base[number] = base;
            m->size[number] = size;
            rc = RK_OK;
        } else {
            *err = errno;
            rc = RK_ERR_IO;
        }
    }
    if (fd >= 0) close(fd);
    return rc;
}

char *rk_segments_find(rk_segments *m, rk_stream *s, uint32_t number, uint64_t offset, uint64_t nbytes, int *rc,
                       int *err) {
    if (number >= RK_MAX_SEGMENTS) {
        *rc = RK_ERR_SHARED;
        return NULL;
    }
    double deadline = rk_now() + s->timeout;
    while (m->base[number] == NULL) {
        *rc = take_segment(m, s, deadline, err);
        if (*rc) return NULL;
    }
    if (offset > m->size[number] || nbytes > m->size[number] - offset) {
        *rc = RK_ERR_SHARED;
        return NULL;
    }
    *rc = RK_OK;
    return m->base[number] + offset;
}

void rk_segments_free(rk_segments *m) {
    for (int i = 0; i < RK_MAX_SEGMENTS; i++)
        if (m->base[i]) munmap(m->base[i], m->size[i]);
    memset(m, 0, sizeof *m);
}

rk_add_fn rk_adder(uint8_t dtype, size_t *itemsize) {
    switch (dtype) {
    case 1: *itemsize = 2; return rdmakv_add_f16;
    case 2: *itemsize = 4; return rdmakv_add_f32;
    case 3: *itemsize = 8; return rdmakv_add_f64;
    case 4: *itemsize = 1; return rdmakv_add_i8;
    case 5: *itemsize = 1; return rdmakv_add_u8;
    case 6: *itemsize = 4; return rdmakv_add_i32;
    case 7: *itemsize = 8; return rdmakv_add_i64;
    default: return NULL;
    }
}

int rk_spin_then_wait(_Atomic uint32_t *word, uint32_t expected, double spin, double deadline) {
    double spin_until = spin > 0 ? rk_now() + spin : 0;
    while (atomic_load(word) == expected) {
        double now = rk_now();
        if (now >= deadline) return 0;
        if (spin_until && now < spin_until) relax_or_yield(spin_until - now, spin);
        else rk_futex_wait(word, expected, deadline - now);
    }
    return 1;
}

void rk_futex_wait(_Atomic uint32_t *word, uint32_t expected, double seconds) {
    int ms = slice_ms(seconds);
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, &ts, NULL, 0);
}

void rk_futex_wake(_Atomic uint32_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

/* ---- table ----------------------------------------------------------------------------- */
static size_t slot_of(uint64_t wire, uint32_t index, size_t capacity) {
    return (size_t)((wire + index * 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull >> 17) & (capacity - 1);
}

void *rk_table_find(const rk_table *t, uint64_t wire, uint32_t index) {
    if (t->capacity == 0) return NULL;
    size_t mask = t->capacity - 1;
    for (size_t i = slot_of(wire, index, t->capacity); t->slots[i].value; i = (i + 1) & mask)
        if (t->slots[i].wire == wire && t->slots[i].index == index) return t->slots[i].value;
    return NULL;
}

static void place(rk_slot *slots, size_t capacity, rk_slot slot) {
    size_t j = slot_of(slot.wire, slot.index, capacity);
    while (slots[j].value) j = (j + 1) & (capacity - 1);
    slots[j] = slot;
}

int rk_table_insert(rk_table *t, uint64_t wire, uint32_t index, void *value) {
    if (2 * (t->count + 1) > t->capacity) {
        size_t capacity = t->capacity ? 2 * t->capacity : 64;
        rk_slot *slots = calloc(capacity, sizeof *slots);
        if (slots == NULL) return -1;
        for (size_t i = 0; i < t->capacity; i++)
            if (t->slots[i].value) place(slots, capacity, t->slots[i]);
        free(t->slots);
        t->slots = slots;
        t->capacity = capacity;
    }
    place(t->slots, t->capacity, (rk_slot){.wire = wire, .index = index, .value = value});
    t->count++;
    return 0;
}

void rk_table_free(rk_table *t) {
    free(t->slots);
    memset(t, 0, sizeof *t);
}

/* ---- mailbox ------------------------------------------------------------------------- */
void rk_mailbox_init(rk_mailbox *m) {
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->lock, NULL);
    pthread_cond_init(&m->ready, NULL);
    pthread_cond_init(&m->drained, NULL);
}

static void append(rk_mailbox *m, rk_event *event) {   /* the caller holds m->lock */
    if (m->tail) m->tail->next = event;
    else m->head = event;
    m->tail = event;
    m->count++;
    m->bytes += event->payload ? event->header.length : 0;
    pthread_cond_signal(&m->ready);
}

void rk_mailbox_post(rk_mailbox *m, rk_event *event) {
    pthread_mutex_lock(&m->lock);
    append(m, event);
    pthread_mutex_unlock(&m->lock);
}

void rk_realtime_in(struct timespec *until, double seconds) {
    clock_gettime(CLOCK_REALTIME, until);
    until->tv_sec += (time_t)seconds;
    until->tv_nsec += (long)((seconds - (double)(time_t)seconds) * 1e9);
    if (until->tv_nsec >= 1000000000L) {
        until->tv_sec++;
        until->tv_nsec -= 1000000000L;
    }
}

int rk_mailbox_post_bounded(rk_mailbox *m, rk_event *event, rk_stream *s) {
    double deadline = rk_now() + s->timeout;
    int rc = RK_OK;
    pthread_mutex_lock(&m->lock);
    while ((m->count >= RK_MAILBOX_EVENTS || m->bytes >= RK_MAILBOX_BYTES) && !m->closing) {
        if (__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
            rc = RK_STOPPED;
            break;
        }
        if (rk_now() >= deadline) {
            rc = RK_ERR_TIMEOUT;
            break;
        }
        struct timespec until;
        rk_realtime_in(&until, SLICE_MS / 1000.0);
        pthread_cond_timedwait(&m->drained, &m->lock, &until);
    }
    if (rc == RK_OK) append(m, event);
    pthread_mutex_unlock(&m->lock);
    if (rc != RK_OK) rk_event_free(event);
    return rc;
}

rk_event *rk_mailbox_next(rk_mailbox *m, double timeout) {
    struct timespec until;
    rk_realtime_in(&until, timeout);
    pthread_mutex_lock(&m->lock);
    while (m->head == NULL && !m->closing)
        if (pthread_cond_timedwait(&m->ready, &m->lock, &until) == ETIMEDOUT) break;
    rk_event *event = m->head;
    if (event) {
        m->head = event->next;
        if (m->head == NULL) m->tail = NULL;
        event->next = NULL;
        m->count--;
        m->bytes -= event->payload ? event->header.length : 0;
        pthread_cond_broadcast(&m->drained);
    }
    pthread_mutex_unlock(&m->lock);
    return event;
}

void rk_mailbox_close(rk_mailbox *m) {
    pthread_mutex_lock(&m->lock);
    m->closing = 1;
    pthread_cond_broadcast(&m->ready);
    pthread_cond_broadcast(&m->drained);
    pthread_mutex_unlock(&m->lock);
}

void rk_mailbox_free(rk_mailbox *m) {
    rk_event *event = m->head;
    while (event) {
        rk_event *next = event->next;
        rk_event_free(event);
        event = next;
    }
    m->head = m->tail = NULL;
}

rk_event *rk_event_new(uint32_t link, uint32_t kind, int error, int sys_errno, const rk_header *h, uint64_t limit) {
    rk_event *event = calloc(1, sizeof *event);
    if (event == NULL) return NULL;
    event->link = link;
    event->kind = kind;
    event->error = error;
    event->sys_errno = sys_errno;
    event->limit = limit;
    if (h) event->header = *h;
    return event;
}

void rk_event_free(rk_event *event) {
    if (event) {
        free(event->payload);
        free(event);
    }
}

/* ---- the send queue: a binary heap --------------------------------------------------- */
static int before(const rk_item *a, const rk_item *b) {
    if (a->priority != b->priority) return a->priority > b->priority;
    if (a->order != b->order) return a->order < b->order;
    if (a->chunk != b->chunk) return a->chunk < b->chunk;
    return a->arrival < b->arrival;
}

static void sift_down(rk_item *items, size_t count, size_t i) {
    for (;;) {
        size_t best = i, left = 2 * i + 1, right = left + 1;
        if (left < count && before(&items[left], &items[best])) best = left;
        if (right < count && before(&items[right], &items[best])) best = right;
        if (best == i) return;
        rk_item swap = items[i];
        items[i] = items[best];
        items[best] = swap;
        i = best;
    }
}

int rk_queue_push(rk_queue *q, rk_item item) {
    if (q->count == q->capacity) {
        size_t capacity = q->capacity ? 2 * q->capacity : 64;
        rk_item *grown = realloc(q->items, capacity * sizeof *grown);
        if (grown == NULL) return -1;
        q->items = grown;
        q->capacity = capacity;
    }
    item.arrival = q->arrivals++;
    size_t i = q->count++;
    q->items[i] = item;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(&q->items[i], &q->items[parent])) break;
        rk_item swap = q->items[i];
        q->items[i] = q->items[parent];
        q->items[parent] = swap;
        i = parent;
    }
    return 0;
}

const rk_item *rk_queue_top(const rk_queue *q) {
    return q->count ? &q->items[0] : NULL;
}

rk_item rk_queue_pop(rk_queue *q) {
    rk_item top = q->items[0];
    q->items[0] = q->items[--q->count];
    sift_down(q->items, q->count, 0);
    return top;
}

void rk_queue_remove_ref(rk_queue *q, const void *ref) {
    size_t kept = 0;
    for (size_t i = 0; i < q->count; i++)
        if (q->items[i].ref != ref) q->items[kept++] = q->items[i];
    if (kept == q->count) return;
    q->count = kept;
    for (size_t i = kept / 2 + 1; i-- > 0;) sift_down(q->items, kept, i);
}

void rk_queue_free(rk_queue *q) {
    free(q->items);
    q->items = NULL;
    q->count = q->capacity = 0;
}
