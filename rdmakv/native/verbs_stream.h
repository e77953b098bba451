/* A link's byte stream over an RC queue pair: each side owns a ring that the
 * peer RDMA-writes into, the way a shared-memory channel's rings work, so the
 * native engines speak the same frames over verbs as over TCP.
 *
 * - The sender copies a frame into its staging ring at the position it will
 *   have in the peer's ring and RDMA-writes that span there; the last write
 *   carries the new head as its immediate (RC places a write before its
 *   immediate's completion, so the bytes are there once the peer sees it).
 * - The receiver copies a frame out of its ring and returns credit (its tail)
 *   as the immediate of a zero-length SEND once a quarter of the ring is free
 *   again.  A peer's counter that cannot be (more than a ring ahead) stops the
 *   stream with RK_ERR_CORRUPT: nothing it sends can make us read outside our
 *   ring or write outside its.
 * - Every immediate lands in a posted zero-length receive, reposted when its
 *   completion is polled; a peer faster than that meets RNR retries, not loss.
 * - One thread at a time polls the completion queue (the leader: it spins,
 *   then sleeps on the completion channel); others wait on a futex the leader
 *   bumps whenever a completion changed something.  So a sender waiting for
 *   credit is woken by whichever thread took the credit in.
 * - The TCP side channel beside the queue pair tells when the peer is gone.
 *
 * The verbs objects (QP, CQ, channel, registered rings) are the Python
 * connection's (rdmakv/transport/verbs/stream.py); this struct borrows them. */
#ifndef RDMAKV_VERBS_STREAM_H
#define RDMAKV_VERBS_STREAM_H
#include <infiniband/verbs.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/uio.h>

#include "_shm.h"
#include "wire.h"

typedef int (*rk_get_cq_event_fn)(struct ibv_comp_channel *, struct ibv_cq **, void **);
typedef void (*rk_ack_cq_events_fn)(struct ibv_cq *, unsigned int);
typedef struct ibv_mr *(*rk_reg_mr_fn)(struct ibv_pd *, void *, size_t, int);
typedef int (*rk_dereg_mr_fn)(struct ibv_mr *);

#define RK_VERBS_CREDIT_SLOTS 4   /* send-queue entries only a credit may take */

typedef struct rk_verbs {
    struct ibv_qp *qp;
    struct ibv_cq *cq;                    /* both queues complete here */
    struct ibv_comp_channel *channel;     /* non-blocking */
    rk_get_cq_event_fn get_cq_event;      /* library functions, bound by the extension */
    rk_ack_cq_events_fn ack_cq_events;
    rk_reg_mr_fn reg_mr;
    rk_dereg_mr_fn dereg_mr;
    int side_fd;                          /* the TCP side channel: readable once the peer is gone */
    int wake_fd;                          /* an eventfd that wakes the leader out of poll() */
    uint32_t send_depth, recv_depth, max_inline;

    char *in_data;                        /* our ring, which the peer writes (power of two) */
    uint32_t in_size;
    _Atomic uint32_t in_head;             /* how far the peer wrote: its immediates */
    _Atomic uint32_t in_tail;             /* how far we read */
    _Atomic uint32_t in_credited;         /* the tail the peer last heard of (under credit_lock) */

    char *out_data;                       /* staging: the peer's ring, mirrored (registered) */
    uint32_t out_lkey, out_size;
    uint64_t peer_addr;                   /* the peer's ring */
    uint32_t peer_rkey;
    _Atomic uint32_t out_head;            /* how far we wrote (and posted) */
    _Atomic uint32_t out_tail;            /* how far the peer read: its credits */

    _Atomic uint32_t send_free;           /* send-queue entries free */
    _Atomic uint32_t failure;             /* 0, or why the stream cannot go on (RK_VERBS_FAILED_*) */
    _Atomic uint32_t peer_gone;
    _Atomic uint32_t closing;             /* shut here: every wait ends */
    _Atomic uint32_t progress;            /* bumped by the leader when something changed */
    _Atomic uint32_t followers;           /* threads asleep on progress */
    uint32_t unacked_events;              /* completion events to acknowledge (leader) */
    int armed;                            /* the CQ will raise an event (leader) */
    pthread_mutex_t poll_lock;            /* held by the leader */
    pthread_mutex_t send_lock;            /* one writer of the staging ring at a time */
    pthread_mutex_t credit_lock;          /* credits are posted in the order of their tails */
    rk_table pinned;                      /* (address, length) -> ibv_mr: rk_verbs_pin's (send_lock) */
    _Atomic uint64_t copied_bytes;        /* copied into staging or out of our ring */
    _Atomic uint64_t placed_bytes;        /* RDMA-written from where they were (registered parts, places) */
} rk_verbs;

#define RK_VERBS_FAILED_COMPLETION 1u     /* + (wc status << 8): a work request failed */
#define RK_VERBS_FAILED_CORRUPT 2u        /* the peer's counters cannot be */
#define RK_VERBS_FAILED_POST 3u           /* + (errno << 8): posting failed */

/* Fill in the counters and locks and post the receives (the QP is at INIT or
 * later, the other fields are set); 0 or an errno. */
int rk_verbs_open(rk_verbs *v);
/* Shut it here: every wait ends (RK_ERR_EOF); sends fail.  Then no thread of
 * ours touches the verbs objects once its call returns. */
void rk_verbs_shut(rk_verbs *v);
/* Wake the threads waiting on v, to look at their stop flags. */
void rk_verbs_wake(rk_verbs *v);
/* Wait up to `seconds` for every posted send to complete (before a goodbye:
 * our last frames must reach the peer before the side channel says we left);
 * 1 once they have, 0 if not. */
int rk_verbs_drain(rk_verbs *v, double seconds);
/* Destroy the locks, deregister what rk_verbs_pin registered and acknowledge the
 * completion events (before the CQ and the PD go). */
void rk_verbs_free(rk_verbs *v);

/* Bytes a send can write now without waiting. */
size_t rk_verbs_room(rk_verbs *v);
/* Bytes that have arrived and are not read. */
size_t rk_verbs_readable(rk_verbs *v);
/* Wait until bytes arrive: RK_OK, RK_STOPPED, RK_ERR_EOF (gone or shut, nothing
 * left), RK_ERR_TIMEOUT (deadline; 0: none), RK_ERR_IO, RK_ERR_CORRUPT.
 * `spin` seconds of polling before sleeping. */
int rk_verbs_wait_readable(rk_verbs *v, rdmakv_flag *stop, double deadline, double spin, int *err);
/* As rk_recv_all / rk_send_all (wire.h); timeout: seconds without progress. */
int rk_verbs_recv(rk_verbs *v, rdmakv_flag *stop, char *dst, size_t length, int at_start, double timeout, int *err);
/* lkeys: NULL, or one per iov: a part with a key is RDMA-written from where it is
 * (memory the caller registered on this stream's PD) instead of through staging. */
int rk_verbs_send(rk_verbs *v, rdmakv_flag *stop, struct iovec *iov, const uint32_t *lkeys, int count,
                  double timeout, int *err);

/* ---- placing bytes in the peer's memory (zero copy) ------------------------------------ */
/* The local key of `length` bytes at addr, registered the first time it is asked
 * for and kept until rk_verbs_free: only for memory that stays where it is, with
 * its contents the caller's, as long as the stream (a server's round buffers);
 * 0 when it cannot be registered (errno in *err). */
uint32_t rk_verbs_pin(rk_verbs *v, const void *addr, size_t length, int *err);
/* RDMA-write length bytes at src (lkey) to remote_addr in the peer's memory
 * (rkey, which the peer gave for it), ahead of whatever is sent on the stream
 * after it: one queue pair, so the peer sees the bytes placed before it reads
 * a later frame.  RK_OK, or as rk_verbs_send. */
int rk_verbs_place(rk_verbs *v, rdmakv_flag *stop, const void *src, size_t length, uint32_t lkey,
                   uint64_t remote_addr, uint32_t rkey, double timeout, int *err);

#endif
