/* What the worker's and the server's native engines share: the wire header,
 * a link's byte stream (a socket or shared-memory rings) with every wait
 * bounded, the peer's memory files, the mailbox that carries events to the
 * control plane (Python), the table of keys or chunks, and the priority queue
 * of chunks waiting to be sent. */
#ifndef RDMAKV_WIRE_H
#define RDMAKV_WIRE_H
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>

#include "_shm.h"

/* rdmakv/core/protocol.py; tests/test_engine.py checks that these agree. */
#define RK_HEADER_SIZE 48
#define RK_MAGIC 0x564B4452u
#define RK_VERSION 1
#define RK_OP_PUSH 12
#define RK_OP_RESULT 13
#define RK_OP_INIT 14
#define RK_OP_STATES 17
#define RK_OP_SET_STATES 18
#define RK_OP_RECEIVED 20
#define RK_OP_HEARTBEAT 31
#define RK_FLAG_BROADCAST 1u
#define RK_FLAG_NO_DATA 2u
#define RK_FLAG_ACK 4u
/* One push per host (_shm.h, host sums): a PUSH whose bytes went into the host's
 * sum, which the local root pushes; a RESULT the worker copies from there.  No
 * bytes follow either. */
#define RK_FLAG_VIA_HOST 8u
#define RK_KNOWN_FLAGS 15u
#define RK_MAX_DTYPE 7
#define RK_MAX_CONTROL_BYTES (1u << 20)
/* Header flag bits only shared memory carries (rdmakv/transport/shm/connection.py):
 * the reader strips them from flags into rk_header.shared. */
#define RK_SHARED_PAYLOAD (1u << 31)  /* a PLACE (segment, offset) follows, not the bytes */
#define RK_EXPOSE (1u << 30)          /* not a message: the sums a chunk's pushes may be added into follow */
#define RK_IN_PLACE (1u << 29)        /* a push already added into the exposed sum: no bytes follow */
#define RK_SHARED_FLAGS (RK_SHARED_PAYLOAD | RK_EXPOSE | RK_IN_PLACE)
/* Header flag bits only verbs carries (verbs_stream.h), taken off flags into
 * rk_header.shared the same way: zero copy for large chunks. */
#define RK_PLACE_RESULT (1u << 28)    /* a push: where to RDMA-write its result follows (RK_PLACE_RESULT_SIZE) */
#define RK_PLACED (1u << 27)          /* a result RDMA-written into that place: no bytes follow */
#define RK_VERBS_FLAGS (RK_PLACE_RESULT | RK_PLACED)
#define RK_PLACE_RESULT_SIZE 12       /* <QI: address, rkey */
#define RK_PLACE_SIZE 12              /* <IQ: segment number, offset */
#define RK_EXPOSED_SIZE 32            /* <IQIQQ: even round's segment and offset, odd's, bytes */
#define RK_SEGMENT_NOTICE_SIZE 12     /* <IQ with a memory file's fd: its number and size */
#define RK_MAX_SEGMENTS 64            /* a peer's memory files one link maps (they double in size) */

#define RK_STOPPED (-1)           /* a wait ended because the stream is closing here */

/* The wire header (rdmakv/core/protocol.py HEADER), unpacked. */
typedef struct {
    uint32_t magic;
    uint16_t version;
    uint8_t op;
    uint8_t dtype;
    uint32_t flags;
    uint64_t key;
    uint32_t chunk;
    int32_t priority;
    uint64_t round;
    uint64_t length;
    uint32_t sender;
    uint32_t shared;          /* not on the wire: the transport's own flag bits (RK_SHARED_FLAGS over shared
                                 memory, RK_VERBS_FLAGS over verbs) the reader took off flags */
} rk_header;

void rk_header_pack(char *out, const rk_header *h);
void rk_header_unpack(const char *in, rk_header *h);
/* RK_OK, or the enum rk_error naming the first bad field (protocol.unpack's checks). */
int rk_header_check(const rk_header *h);

enum rk_error {
    RK_OK = 0,
    RK_ERR_EOF,               /* the peer closed the connection between messages */
    RK_ERR_MIDSTREAM,         /* the peer closed the connection inside a message */
    RK_ERR_TIMEOUT,           /* no progress inside a message for the stream's timeout */
    RK_ERR_IO,                /* a system call failed: sys_errno */
    RK_ERR_BAD_MAGIC,         /* header.magic */
    RK_ERR_BAD_VERSION,       /* header.version */
    RK_ERR_BAD_OP,            /* header.op */
    RK_ERR_BAD_FLAGS,         /* header.flags */
    RK_ERR_BAD_DTYPE,         /* header.dtype */
    RK_ERR_TOO_LARGE,         /* header.length above what this op may carry: limit */
    RK_ERR_UNEXPECTED_RESULT, /* a RESULT nothing waits for */
    RK_ERR_RESULT_LENGTH,     /* a RESULT of the wrong size: limit is the chunk's */
    RK_ERR_NO_MEMORY,
    RK_ERR_REFUSED,           /* the control plane refused the message: the stream stops */
    RK_ERR_CORRUPT,           /* shared memory: ring counters that cannot be (a bug or a hostile peer) */
    RK_ERR_SHARED,            /* a frame's transport flags (shared memory, verbs) or places this link did not agree to */
    RK_ERR_UNREAD,            /* (server, asynchronous mode) a push came while the worker left its
                                 reply to the chunk's last one unread for the stream's timeout */
    RK_ERR_VIA_HOST,          /* a push or result flagged VIA_HOST where the job's plan has none */
    RK_ERR_HOST_STALLED,      /* host sums: the host's other workers (or its root) stalled past the timeout */
};

/* ---- a link's byte stream, every wait bounded ---------------------------------- */
/* Over TCP, reads go through a small buffer, so that one recv takes in a header and
 * a small payload, or several small messages; a payload of RK_DIRECT_READ bytes or
 * more goes from the socket straight into its destination.
 * Over shared memory the stream is the two rings of an rdmakv ShmChannel (_shm.h),
 * borrowed: the ring is its own buffer, and the Unix socket beside it (fd) carries
 * the peer's memory files and tells when the peer is gone.
 * Over verbs it is an rk_verbs (verbs_stream.h): rings the peers RDMA-write
 * into, with the same frames as TCP. */
#define RK_READ_BUFFER (64 * 1024)
#define RK_DIRECT_READ (16 * 1024)

typedef struct {
    rdmakv_ring out, in;
    rdmakv_flag *closing;     /* the channel's own stop flag: its owner shut it */
} rk_rings;

struct rk_verbs;

typedef struct {
    int fd;                   /* the TCP socket, the Unix socket beside the rings, or the verbs side channel */
    rdmakv_flag stop;         /* set to end every wait on the stream */
    int has_rings;            /* shared memory: rings carry the bytes */
    rk_rings rings;
    struct rk_verbs *verbs;   /* verbs: a queue pair carries the bytes (verbs_stream.h; borrowed) */
    double timeout;           /* seconds without progress inside a message */
    char *in;                 /* RK_READ_BUFFER bytes read ahead: [in_start, in_end) are unread */
    size_t in_start, in_end;
    double spin;              /* seconds to poll for a message before sleeping in poll() (RDMAKV_SPIN_US) */
    /* Bytes of frames that crossed the stream whole (headers, payloads, places), each
     * way: what rk_send_all sent and what rk_recv_all and rk_read_header took in. */
    _Atomic uint64_t sent_bytes, received_bytes;
} rk_stream;

/* Open the stream on fd (allocates the read buffer), over rings or a verbs stream
 * when one is given (borrowed: their owner frees them only after the stream's
 * threads are joined); 0 or ENOMEM. */
int rk_stream_open(rk_stream *s, int fd, const rk_rings *rings, struct rk_verbs *verbs, double timeout);
/* out[0]: bytes sent, out[1]: bytes received so far (sent_bytes, received_bytes). */
void rk_stream_wire_bytes(rk_stream *s, uint64_t out[2]);
/* Whether the stream has a buffer of its own whose room rk_stream_room tells (rings, verbs). */
int rk_stream_buffered(const rk_stream *s);
/* Bytes a send over rings or verbs can write now without waiting (0 over TCP). */
size_t rk_stream_room(rk_stream *s);
/* Wake every thread of ours waiting on the stream (after setting stop). */
void rk_stream_wake(rk_stream *s);
void rk_stream_free(rk_stream *s);
/* After the stream's threads are joined: no send may reach its descriptor again
 * (the owner may close it, and the number be reused); later sends fail with EBADF. */
void rk_stream_retire(rk_stream *s, pthread_mutex_t *send_lock);
/* pthread_join, except of the calling thread (a callback may close from an engine
 * thread: it stops at its next loop, having seen the stop flag). */
void rk_join(pthread_t thread);
/* Move up to n read-ahead bytes into dst (for a reader that hands the rest of a
 * message to someone reading the socket itself); how many. */
size_t rk_stream_take_buffered(rk_stream *s, char *dst, size_t n);

double rk_now(void);
/* 0 once ready for events, RK_STOPPED, RK_ERR_TIMEOUT after the deadline (0: none), RK_ERR_IO. */
int rk_wait_fd(rk_stream *s, short events, double deadline, int *err);
/* Fill dst; RK_OK, RK_ERR_EOF (closed before the first byte, when at_start),
 * RK_ERR_MIDSTREAM, RK_ERR_TIMEOUT, RK_ERR_IO, RK_STOPPED. */
int rk_recv_all(rk_stream *s, char *dst, size_t length, int at_start, int *err);
/* Write every byte of iov (callers serialize); RK_OK, RK_ERR_TIMEOUT, RK_ERR_IO. */
int rk_send_all(rk_stream *s, struct iovec *iov, int count, int *err);
/* As rk_send_all; lkeys (NULL, or one per iov, 0 for none) name parts a verbs stream
 * RDMA-writes from where they are (registered on its PD); other streams ignore them. */
int rk_send_registered(rk_stream *s, struct iovec *iov, const uint32_t *lkeys, int count, int *err);
/* The next header, checked; 0, an enum rk_error, or RK_STOPPED.  *have_header
 * says whether h holds what arrived (for the error report). */
int rk_read_header(rk_stream *s, rk_header *h, int *have_header, int *err);

/* The peer's memory files a shared-memory link has mapped, by number. */
typedef struct {
    char *base[RK_MAX_SEGMENTS];
    uint64_t size[RK_MAX_SEGMENTS];
} rk_segments;
/* Where nbytes at (segment, offset) of the peer's memory are mapped here, taking the
 * segment's fd from the stream's Unix socket when it is new (the peer sends it
 * ahead of the first frame naming it); NULL with *rc an enum rk_error. */
char *rk_segments_find(rk_segments *m, rk_stream *s, uint32_t number, uint64_t offset, uint64_t nbytes, int *rc,
                       int *err);
void rk_segments_free(rk_segments *m);

/* dst += src for count items of a dtype code (rdmakv/core/protocol.py); NULL for none. */
typedef void (*rk_add_fn)(void *dst, const void *src, size_t count);
rk_add_fn rk_adder(uint8_t dtype, size_t *itemsize);

/* The CLOCK_REALTIME time `seconds` from now (pthread_cond_timedwait's clock). */
void rk_realtime_in(struct timespec *until, double seconds);

void rk_futex_wait(_Atomic uint32_t *word, uint32_t expected, double seconds);
/* Wait for *word to leave `expected`: poll it for `spin` seconds (spinning, then
 * yielding the CPU), then sleep on the futex in slices until `deadline`; 1 once it
 * left, 0 at the deadline. */
int rk_spin_then_wait(_Atomic uint32_t *word, uint32_t expected, double spin, double deadline);
void rk_futex_wake(_Atomic uint32_t *word);

/* ---- an ordering only the peer's process establishes -------------------------------- */
/* A peer answers only what it read: whatever this process did before publishing
 * a message into a ring (reading a push's source, say) happens before what it
 * does with the answer it then reads from the other ring (writing the result,
 * perhaps into that same array).  The edge runs through the peer's process,
 * where ThreadSanitizer cannot see it; these tell it, per stream, and compile
 * to nothing in any other build.
 *
 * Over TCP the kernel reads a send's bytes inside sendmsg, before any of them
 * can reach the peer, but ThreadSanitizer's sendmsg checks those reads only
 * once the call returns: by then an asynchronous server may have answered the
 * batch's first chunk, and our reader written the answer into that chunk's
 * array, while the call still sent the batch's last.  So the reads are checked
 * before the call (RK_SENDING: then published, as a ring's are), not again
 * after it (RK_SENT), and the reader observes the stream before each receive. */
#if defined(__SANITIZE_THREAD__)
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
void __tsan_read_range(void *addr, unsigned long size);
void AnnotateIgnoreReadsBegin(const char *file, int line);
void AnnotateIgnoreReadsEnd(const char *file, int line);
#define RK_PUBLISHED(stream) __tsan_release(stream)
#define RK_OBSERVED(stream) __tsan_acquire(stream)
#define RK_SENDING(stream, iov, count)                                                  \
    do {                                                                                \
        for (int rk_part = 0; rk_part < (count); rk_part++)                             \
            __tsan_read_range((iov)[rk_part].iov_base, (iov)[rk_part].iov_len);         \
        __tsan_release(stream);                                                         \
        AnnotateIgnoreReadsBegin(__FILE__, __LINE__);                                   \
    } while (0)
#define RK_SENT() AnnotateIgnoreReadsEnd(__FILE__, __LINE__)
#else
#define RK_PUBLISHED(stream) ((void)(stream))
#define RK_OBSERVED(stream) ((void)(stream))
#define RK_SENDING(stream, iov, count) ((void)(stream))
#define RK_SENT() ((void)0)
#endif

/* ---- events for the control plane ------------------------------------------------ */
enum rk_event_kind {
    RK_EVENT_MESSAGE = 1,     /* a control message */
    RK_EVENT_CLOSED = 2,      /* a link's reader stopped: error says why */
    RK_EVENT_SEND_FAILED = 3, /* a send on the link failed: error says why */
    RK_EVENT_REFUSED = 4,     /* (server) a push the engine refused: error is an enum rk_refusal */
    RK_EVENT_SUMMED = 5,      /* (server) a round is summed and waits for the control plane (an optimizer) */
    RK_EVENT_PUSHED = 6,      /* (server, asynchronous mode) a push waits for the control plane (an optimizer) */
};

typedef struct rk_event {
    struct rk_event *next;
    uint32_t link;
    uint32_t kind;
    int32_t error;
    int32_t sys_errno;
    uint64_t limit;
    rk_header header;         /* the message, or the one that broke the link */
    char *payload;            /* header.length bytes, malloc'd: rk_event_free() */
} rk_event;

/* What a peer can make wait in a mailbox: a reader posting past this waits for the control plane. */
#define RK_MAILBOX_EVENTS 1024
#define RK_MAILBOX_BYTES (64u << 20)

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t ready;
    pthread_cond_t drained;
    rk_event *head, *tail;
    size_t count, bytes;          /* events waiting, and their payload bytes */
    int closing;
} rk_mailbox;

void rk_mailbox_init(rk_mailbox *m);
void rk_mailbox_post(rk_mailbox *m, rk_event *event);
/* Post what a peer sent: while the mailbox is full, wait (the stream's timeout,
 * its stop flag); RK_OK, RK_ERR_TIMEOUT or RK_STOPPED (the event is then freed). */
int rk_mailbox_post_bounded(rk_mailbox *m, rk_event *event, rk_stream *s);
/* The oldest event; NULL after timeout seconds or once closing. */
rk_event *rk_mailbox_next(rk_mailbox *m, double timeout);
void rk_mailbox_close(rk_mailbox *m);
void rk_mailbox_free(rk_mailbox *m);
rk_event *rk_event_new(uint32_t link, uint32_t kind, int error, int sys_errno, const rk_header *h, uint64_t limit);
void rk_event_free(rk_event *event);

/* ---- a table of what the engine knows, by (wire key, chunk index) -------------------- */
/* Open addressing, at most half full; the caller serializes (its own lock). */
typedef struct {
    uint64_t wire;
    uint32_t index;
    void *value;              /* NULL: an empty slot */
} rk_slot;

typedef struct {
    rk_slot *slots;
    size_t capacity, count;
} rk_table;

void *rk_table_find(const rk_table *t, uint64_t wire, uint32_t index);
/* Add value (not NULL) under (wire, index), which must be new; 0, or -1 out of memory. */
int rk_table_insert(rk_table *t, uint64_t wire, uint32_t index, void *value);
void rk_table_free(rk_table *t);

/* ---- a priority queue of chunks to send --------------------------------------------- */
typedef struct {
    int32_t priority;         /* highest first, */
    uint32_t order;           /* then key declaration order, */
    uint32_t chunk;           /* then chunk index, */
    uint64_t arrival;         /* then first come first served */
    uint64_t credit;          /* bytes of credit it holds once sent */
    void *ref;                /* what the owner queued */
    uint64_t tag;             /* the owner's */
    const char *data;         /* (server replies) the payload, */
    uint8_t op;               /* the op, */
    uint8_t via_host;         /* whether the worker takes it from its host (RK_FLAG_VIA_HOST), */
    uint32_t place_rkey;      /* (verbs) and where the worker asked for it to be written: */
    uint64_t place_addr;      /* rkey 0 for nowhere */
} rk_item;

#define RK_BATCH 32               /* queued messages one sendmsg may carry, */
#define RK_BATCH_BYTES (256 * 1024)   /* up to about this many bytes */

typedef struct {
    rk_item *items;
    size_t count, capacity;
    uint64_t arrivals;
} rk_queue;

int rk_queue_push(rk_queue *q, rk_item item);   /* 0, or -1 out of memory */
const rk_item *rk_queue_top(const rk_queue *q);
rk_item rk_queue_pop(rk_queue *q);
void rk_queue_remove_ref(rk_queue *q, const void *ref);
void rk_queue_free(rk_queue *q);

#endif
