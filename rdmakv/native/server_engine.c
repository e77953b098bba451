/* The server's native data plane (server_engine.h).  Locks, from outer to
 * inner: a chunk's lock (its round), then a link's lock (its reply queue),
 * then its send_lock (the socket's byte stream).  table_lock (the chunk
 * table) is never held with another.  A link's reader waits (for its own
 * worker to take a reply in, asynchronous mode) holding none. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "server_engine.h"

#include "codec.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "_reduce.h"
#include "verbs_stream.h"

struct rk_skey {
    uint64_t wire;
    _Atomic int refused;
    _Atomic uint64_t *declared_by;   /* a bit per worker rank */
    rk_schunk *chunks;
    rk_skey *next;
};

typedef struct {
    uint64_t addr;
    uint32_t rkey;                /* 0: none */
    uint64_t round;
} rk_place;

struct rk_schunk {
    rk_skey *key;
    uint32_t index;
    uint8_t dtype;
    uint64_t nbytes;
    char *buffers[2];             /* round r sums into buffers[r % 2] */
    /* Shared memory: the buffers lie in memory files co-located workers map
     * (segment number, offset each); they add their pushes in themselves, so
     * every contribution goes through the sum's own lock (_shm.h). */
    int shared;
    uint32_t segments[2];
    uint64_t offsets[2];
    /* Asynchronous mode: buffers[0] is the stored value, and a worker's reply
     * leaves from its own copy (snapshots + rank * nbytes).  unsent counts, per
     * worker, the replies that copy is written for and that are not sent yet:
     * raised under the lock with the copy, lowered once the reply left (under
     * the link's lock) or will never leave.  The copy is written only at zero,
     * so nothing is sent from it while it changes, and a worker that does not
     * read its replies holds at most one per chunk here. */
    char *snapshots;
    _Atomic uint32_t *unsent;
    /* Verbs: where each worker asked for its result of a round to be written
     * (RK_PLACE_RESULT); entry `rank` is under that worker's link lock. */
    rk_place *places;
    pthread_mutex_t lock;         /* what follows */
    uint64_t *rounds;             /* asynchronous mode (set only there): each worker's next round */
    uint64_t round;
    uint64_t *pushed;             /* a bit per worker that pushed this round */
    /* One push per host: a bit per worker whose push of round r went into its host's
     * sum (via_host + (r % 2) * words; cleared as round r opens), so its result goes
     * as a header: it copies the result from its host. */
    uint64_t *via_host;
    uint32_t pushes;
    int has_data;
    uint32_t flags;               /* the last push's */
    double opened;                /* when the round's first push arrived */
    int reported;                 /* the round was reported stale */
    rk_schunk *next_in_key;
    rk_schunk *next_declared;
    /* Gradient compression (codec.h; float32, private buffers): a pushpull's push
     * arrives encoded, at most max_encoded bytes, and is decoded into the round's
     * sum; where the codec compresses the pull too, the sum is encoded into
     * pulled[round % 2] (pulled_bytes long) by the reader that completed it. */
    int compressed;
    struct rk_codec codec;
    struct rk_codec_state pull_state;
    uint64_t max_encoded;
    char *pulled[2];
    uint64_t pulled_bytes[2];
};

typedef struct {
    rk_server *server;
    uint32_t rank;
    rk_stream stream;
    int started;
    _Atomic int active;           /* replies go to it */
    _Atomic uint64_t segments;    /* shared memory: a bit per memory file of ours the worker has */
    _Atomic int via_host;         /* the job's plan has this worker push through its host's root */
    pthread_t reader, replier;
    pthread_mutex_t lock;
    pthread_cond_t ready;
    pthread_cond_t sent;          /* a reply from a snapshot left (the reader may wait for it) */
    rk_queue queue;               /* replies: ref the chunk, tag the round */
    int sending;
    int send_failed;
    pthread_mutex_t send_lock;
    pthread_mutex_t verdict_lock;
    pthread_cond_t verdict_ready;
    int awaiting;                 /* the reader waits for the control plane's verdict */
    int verdict;
    char *scratch;                /* where a push lands before it is summed */
    size_t scratch_size;
} rk_slink;

struct rk_server {
    uint32_t num_workers;
    uint32_t words;               /* 64-bit words of a worker bitmap */
    uint64_t direct_bytes;
    rk_slink *links;
    pthread_rwlock_t table_lock;
    rk_table table;               /* (wire, index) -> rk_schunk */
    rk_skey *keys;
    rk_schunk *declared;
    _Atomic int departed;
    _Atomic int optimizer;
    rk_mailbox mailbox;
    int closed;
    pid_t pid;                    /* the process that owns the threads */
};

/* ---- the sum ----------------------------------------------------------------------- */
/* Contribute a push to its round's sum in target (the chunk's lock held): the
 * round's first contribution is copied in, later ones added.  A shared chunk's
 * sum keeps its own lock and round (co-located workers add into it too); 0, or
 * RK_REFUSE_SUM_STALLED when its lock stays held past the timeout. */
static int contribute(rk_slink *link, rk_schunk *chunk, char *target, const char *source, uint64_t nbytes) {
    if (chunk->compressed && !(chunk->flags & RK_FLAG_BROADCAST)) {
        /* An encoding: checked whole before a value is added (a hostile one leaves the sum as it was). */
        size_t count = chunk->nbytes / 4;
        if (!chunk->has_data) memset(target, 0, chunk->nbytes);
        return rk_codec_decode_add(&chunk->codec, source, nbytes, (float *)target, count) ? RK_REFUSE_ENCODING : 0;
    }
    size_t itemsize = 1;
    rk_add_fn add = rk_adder(chunk->dtype, &itemsize);   /* declarations carry only known dtypes */
    if (chunk->shared) {
        int rc = rdmakv_sum_contribute(target, source, nbytes, (rdmakv_add_fn)add, itemsize, chunk->round,
                                       link->stream.timeout, &link->stream.stop);
        return rc == 0 ? 0 : RK_REFUSE_SUM_STALLED;   /* or stopped here: the refusal goes nowhere */
    }
    if (chunk->has_data) add(target, source, nbytes / itemsize);
    else memcpy(target, source, nbytes);
    return 0;
}

/* ---- the chunk table ----------------------------------------------------------------- */
static rk_schunk *find_chunk(rk_server *server, uint64_t wire, uint32_t index) {
    pthread_rwlock_rdlock(&server->table_lock);
    rk_schunk *found = rk_table_find(&server->table, wire, index);
    pthread_rwlock_unlock(&server->table_lock);
    return found;
}

rk_skey *rk_server_add_key(rk_server *server, uint64_t wire) {
    rk_skey *key = calloc(1, sizeof *key);
    if (key == NULL) return NULL;
    key->declared_by = calloc(server->words, sizeof *key->declared_by);
    if (key->declared_by == NULL) {
        free(key);
        return NULL;
    }
    key->wire = wire;
    pthread_rwlock_wrlock(&server->table_lock);
    key->next = server->keys;
    server->keys = key;
    pthread_rwlock_unlock(&server->table_lock);
    return key;
}

static rk_schunk *new_chunk(rk_server *server) {
    rk_schunk *chunk = calloc(1, sizeof *chunk);
    if (chunk == NULL) return NULL;
    chunk->pushed = calloc(server->words, sizeof *chunk->pushed);
    chunk->places = calloc(server->num_workers ? server->num_workers : 1, sizeof *chunk->places);
    chunk->via_host = calloc(2 * server->words, sizeof *chunk->via_host);
    if (chunk->pushed == NULL || chunk->places == NULL || chunk->via_host == NULL) {
        free(chunk->pushed);
        free(chunk->places);
        free(chunk->via_host);
        free(chunk);
        return NULL;
    }
    pthread_mutex_init(&chunk->lock, NULL);
    return chunk;
}

static void free_chunk(rk_schunk *chunk) {
    rk_codec_state_free(&chunk->pull_state);
    free(chunk->pulled[0]);
    free(chunk->pulled[1]);
    free(chunk->pushed);
    free(chunk->places);
    free(chunk->via_host);
    free(chunk->rounds);
    free(chunk->unsent);
    free(chunk);
}

/* Into the table and the key's list; NULL (chunk freed) if it cannot be. */
static rk_schunk *insert_chunk(rk_server *server, rk_skey *key, rk_schunk *chunk) {
    pthread_rwlock_wrlock(&server->table_lock);
    int rc = rk_table_insert(&server->table, key->wire, chunk->index, chunk);
    if (rc == 0) {
        chunk->next_in_key = key->chunks;
        key->chunks = chunk;
        chunk->next_declared = server->declared;
        server->declared = chunk;
    }
    pthread_rwlock_unlock(&server->table_lock);
    if (rc) {
        free_chunk(chunk);
        return NULL;
    }
    return chunk;
}

rk_schunk *rk_server_add_chunk(rk_server *server, rk_skey *key, uint32_t index, uint8_t dtype, uint64_t nbytes,
                               char *buffer0, char *buffer1, const uint64_t *places) {
    rk_schunk *chunk = new_chunk(server);
    if (chunk == NULL) return NULL;
    chunk->key = key;
    chunk->index = index;
    chunk->dtype = dtype;
    chunk->nbytes = nbytes;
    chunk->buffers[0] = buffer0;
    chunk->buffers[1] = buffer1;
    if (places) {
        chunk->shared = 1;
        for (int parity = 0; parity < 2; parity++) {
            chunk->segments[parity] = (uint32_t)places[2 * parity];
            chunk->offsets[parity] = places[2 * parity + 1];
        }
    }
    return insert_chunk(server, key, chunk);
}

rk_schunk *rk_server_add_async_chunk(rk_server *server, rk_skey *key, uint32_t index, uint8_t dtype,
                                     uint64_t nbytes, char *stored, char *snapshots) {
    rk_schunk *chunk = new_chunk(server);
    if (chunk == NULL) return NULL;
    chunk->rounds = calloc(server->num_workers ? server->num_workers : 1, sizeof *chunk->rounds);
    chunk->unsent = calloc(server->num_workers ? server->num_workers : 1, sizeof *chunk->unsent);
    if (chunk->rounds == NULL || chunk->unsent == NULL) {
        free_chunk(chunk);
        return NULL;
    }
    chunk->key = key;
    chunk->index = index;
    chunk->dtype = dtype;
    chunk->nbytes = nbytes;
    chunk->buffers[0] = stored;
    chunk->snapshots = snapshots;
    return insert_chunk(server, key, chunk);
}

void rk_server_hold_chunk(rk_schunk *chunk) {
    pthread_mutex_lock(&chunk->lock);
}

void rk_server_release_chunk(rk_schunk *chunk) {
    pthread_mutex_unlock(&chunk->lock);
}

void rk_server_set_value(rk_schunk *chunk, const char *data) {
    pthread_mutex_lock(&chunk->lock);
    if (chunk->nbytes) memcpy(chunk->buffers[0], data, chunk->nbytes);
    pthread_mutex_unlock(&chunk->lock);
}

void rk_server_declared_by(rk_skey *key, uint32_t rank) {
    atomic_fetch_or(&key->declared_by[rank / 64], 1ull << (rank % 64));
}

void rk_server_refuse_key(rk_skey *key) {
    atomic_store(&key->refused, 1);
}

void rk_server_departed(rk_server *server) {
    atomic_store(&server->departed, 1);
}

void rk_server_set_spin(rk_server *server, double seconds) {
    for (uint32_t rank = 0; rank < server->num_workers; rank++) server->links[rank].stream.spin = seconds;
}

void rk_server_link_has_segment(rk_server *server, uint32_t rank, uint32_t number) {
    if (number < 64) atomic_fetch_or(&server->links[rank].segments, 1ull << number);
}

void rk_server_allow_via_host(rk_server *server, uint32_t rank) {
    atomic_store(&server->links[rank].via_host, 1);
}

void rk_server_set_optimizer(rk_server *server, int on) {
    atomic_store(&server->optimizer, on);
}

void rk_server_link_wire_bytes(rk_server *server, uint32_t rank, uint64_t out[2]) {
    rk_stream_wire_bytes(&server->links[rank].stream, out);
}

uint32_t rk_server_words_per_chunk(rk_server *server) {
    return server->words;
}

/* ---- replies ----------------------------------------------------------------------- */
static char *snapshot_of(const rk_schunk *chunk, uint32_t rank) {   /* NULL for an empty chunk */
    return chunk->snapshots ? chunk->snapshots + (size_t)rank * chunk->nbytes : NULL;
}

static void post(rk_server *server, uint32_t rank, uint32_t kind, int error, int sys_errno, const rk_header *h,
                 uint64_t limit) {
    rk_event *event = rk_event_new(rank, kind, error, sys_errno, h, limit);
    if (event) rk_mailbox_post(&server->mailbox, event);
}

static uint64_t reply_bytes(const rk_item *item) {
    const rk_schunk *chunk = item->ref;
    if (item->op != RK_OP_RESULT || item->via_host) return 0;
    int parity = (int)(item->tag % 2);
    return chunk->compressed && item->data == chunk->pulled[parity] ? chunk->pulled_bytes[parity] : chunk->nbytes;
}

static int has_segment(rk_slink *link, uint32_t number) {
    return number < 64 && ((atomic_load(&link->segments) >> number) & 1);
}

/* Whether a RESULT carrying data can go as the place of a shared round buffer
 * (the worker copies it out of our memory) instead of its bytes. */
static int goes_as_place(rk_slink *link, const rk_item *item, uint32_t *number, uint64_t *offset) {
    rk_schunk *chunk = item->ref;
    int parity = (int)(item->tag % 2);
    if (item->op != RK_OP_RESULT || !chunk->shared || !link->stream.has_rings ||
        item->data != chunk->buffers[parity] || !has_segment(link, chunk->segments[parity]))
        return 0;
    *number = chunk->segments[parity];
    *offset = chunk->offsets[parity];
    return 1;
}

/* Whether data is memory the chunk keeps as long as the engine (its round
 * buffers, its replies' copies), which a verbs link may register once for good. */
static int lasting(const rk_server *server, const rk_schunk *chunk, const char *data) {
    if (data == chunk->buffers[0] || data == chunk->buffers[1]) return 1;
    return chunk->snapshots && data >= chunk->snapshots &&
           data < chunk->snapshots + (size_t)server->num_workers * chunk->nbytes;
}

/* Verbs: RDMA-write a result straight into the place its worker gave (the
 * caller holds send_lock, so the write goes ahead of the RESULT's frame);
 * RK_OK with *placed 0 when its bytes must go in the frame instead. */
static int place_result(rk_slink *link, const rk_item *item, int *placed, int *err) {
    rk_schunk *chunk = item->ref;
    *placed = 0;
    if (!link->stream.verbs || !item->place_rkey || item->op != RK_OP_RESULT || !lasting(link->server, chunk, item->data))
        return RK_OK;
    int unpinned = 0;
    uint32_t lkey = rk_verbs_pin(link->stream.verbs, item->data, chunk->nbytes, &unpinned);
    if (lkey == 0) return RK_OK;  /* out of registrations: the bytes go through the ring */
    int rc = rk_verbs_place(link->stream.verbs, &link->stream.stop, item->data, chunk->nbytes, lkey,
                            item->place_addr, item->place_rkey, link->stream.timeout, err);
    *placed = rc == RK_OK;
    if (*placed) atomic_fetch_add_explicit(&link->stream.sent_bytes, chunk->nbytes, memory_order_relaxed);
    return rc;
}

/* A reply left, or never will (the link's lock held): its snapshot may be written again. */
static void sent_from_snapshot(rk_slink *link, const rk_item *item) {
    rk_schunk *chunk = item->ref;
    if (item->op != RK_OP_RESULT || chunk->unsent == NULL || item->data != snapshot_of(chunk, link->rank)) return;
    atomic_fetch_sub(&chunk->unsent[link->rank], 1);
    pthread_cond_broadcast(&link->sent);
}

/* Send popped replies with one sendmsg, then let the next sender in (the caller set link->sending). */
static void transmit(rk_slink *link, const rk_item *items, int count) {
    char packed[RK_BATCH][RK_HEADER_SIZE];
    char places[RK_BATCH][RK_PLACE_SIZE];
    struct iovec iov[2 * RK_BATCH];
    rk_header h;
    int parts = 0, rc = RK_OK, err = 0;
    pthread_mutex_lock(&link->send_lock);
    for (int i = 0; i < count && rc == RK_OK; i++) {
        rk_schunk *chunk = items[i].ref;
        h = (rk_header){.magic = RK_MAGIC, .version = RK_VERSION, .op = items[i].op,
                        .dtype = items[i].op == RK_OP_RESULT ? chunk->dtype : 0, .key = chunk->key->wire,
                        .chunk = chunk->index, .priority = items[i].priority, .round = items[i].tag,
                        .length = reply_bytes(&items[i]),
                        .flags = items[i].via_host ? RK_FLAG_VIA_HOST : 0};
        uint32_t number;
        uint64_t offset;
        int placed = 0;
        int place = h.length && goes_as_place(link, &items[i], &number, &offset);
        if (place) {
            h.flags |= RK_SHARED_PAYLOAD;
            memcpy(places[i], &number, 4);
            memcpy(places[i] + 4, &offset, 8);
        } else if (h.length) {
            rc = place_result(link, &items[i], &placed, &err);
            if (placed) h.flags |= RK_PLACED;
        }
        rk_header_pack(packed[i], &h);
        iov[parts++] = (struct iovec){packed[i], RK_HEADER_SIZE};
        if (place) iov[parts++] = (struct iovec){places[i], RK_PLACE_SIZE};
        else if (h.length && !placed) iov[parts++] = (struct iovec){(char *)items[i].data, h.length};
    }
    if (rc == RK_OK) rc = rk_send_all(&link->stream, iov, parts, &err);
    pthread_mutex_unlock(&link->send_lock);
    pthread_mutex_lock(&link->lock);
    int report = rc != RK_OK && !link->send_failed;
    if (rc != RK_OK) link->send_failed = 1;
    for (int i = 0; i < count; i++) sent_from_snapshot(link, &items[i]);   /* or never will be */
    link->sending = 0;
    if (link->queue.count) pthread_cond_signal(&link->ready);
    pthread_mutex_unlock(&link->lock);
    if (report) post(link->server, link->rank, RK_EVENT_SEND_FAILED, rc, err, &h, 0);
}

/* Queue a reply; a small one with nothing ahead of it goes from this thread. */
static void reply(rk_slink *link, rk_item item) {
    int direct = 0;
    pthread_mutex_lock(&link->lock);
    rk_place *place = &((rk_schunk *)item.ref)->places[link->rank];
    if (item.op == RK_OP_RESULT && place->rkey && place->round == item.tag) {
        item.place_addr = place->addr;
        item.place_rkey = place->rkey;
        place->rkey = 0;          /* one result per push */
    }
    if (link->send_failed || rk_queue_push(&link->queue, item)) {
        sent_from_snapshot(link, &item);
        pthread_mutex_unlock(&link->lock);
        return;                   /* the control plane hears of the link's failure once */
    }
    /* Over a ring, only if it fits now: a worker that stops reading must not
     * hold up the reader (another worker's) that completed the round. */
    uint64_t bytes = reply_bytes(&item);
    if (!link->sending && link->queue.count == 1 && bytes <= link->server->direct_bytes &&
        (!rk_stream_buffered(&link->stream) || rk_stream_room(&link->stream) >= RK_HEADER_SIZE + bytes)) {
        item = rk_queue_pop(&link->queue);
        link->sending = 1;
        direct = 1;
    } else {
        pthread_cond_signal(&link->ready);
    }
    pthread_mutex_unlock(&link->lock);
    if (direct) transmit(link, &item, 1);
}

static void *replier_main(void *arg) {
    rk_slink *link = arg;
    pthread_mutex_lock(&link->lock);
    for (;;) {
        while (!link->stream.stop && (link->sending || link->queue.count == 0))
            pthread_cond_wait(&link->ready, &link->lock);
        if (link->stream.stop) break;
        /* What waits leaves in the same sendmsg: one system call, not one a reply. */
        rk_item items[RK_BATCH];
        int count = 0;
        uint64_t bytes = 0;
        while (count < RK_BATCH && bytes < RK_BATCH_BYTES && link->queue.count) {
            items[count] = rk_queue_pop(&link->queue);
            bytes += reply_bytes(&items[count++]);
        }
        link->sending = 1;
        pthread_mutex_unlock(&link->lock);
        transmit(link, items, count);
        pthread_mutex_lock(&link->lock);
    }
    pthread_mutex_unlock(&link->lock);
    return NULL;
}

static void reply_all(rk_server *server, rk_schunk *chunk, uint64_t round, int32_t priority, const char *data);

/* A round's result the control plane made (an optimizer's weight): encoded first
 * where the chunk's codec compresses the pull, as a sum would be. */
void rk_server_reply_all(rk_server *server, rk_schunk *chunk, uint64_t round, int32_t priority, const char *data) {
    int parity = (int)(round % 2);
    if (chunk->pulled[parity]) {
        chunk->pulled_bytes[parity] = rk_codec_encode(&chunk->codec, &chunk->pull_state, (const float *)data,
                                                      chunk->nbytes / 4, chunk->pulled[parity]);
        data = chunk->pulled[parity];
    }
    reply_all(server, chunk, round, priority, data);
}

static void reply_all(rk_server *server, rk_schunk *chunk, uint64_t round, int32_t priority, const char *data) {
    rk_item item = {.priority = priority, .ref = chunk, .tag = round, .data = data, .op = RK_OP_RESULT};
    const uint64_t *via_host = chunk->via_host + (round % 2) * server->words;
    for (uint32_t rank = 0; rank < server->num_workers; rank++) {
        item.via_host = (uint8_t)((via_host[rank / 64] >> (rank % 64)) & 1);
        if (atomic_load(&server->links[rank].active)) reply(&server->links[rank], item);
    }
}

void rk_server_reply_one(rk_server *server, rk_schunk *chunk, uint32_t rank, uint64_t round, int32_t priority) {
    rk_item item = {.priority = priority, .ref = chunk, .tag = round, .data = snapshot_of(chunk, rank),
                    .op = RK_OP_RESULT};
    if (rank >= server->num_workers) return;
    rk_slink *link = &server->links[rank];
    if (atomic_load(&link->active)) {
        reply(link, item);
    } else {
        pthread_mutex_lock(&link->lock);
        sent_from_snapshot(link, &item);
        pthread_mutex_unlock(&link->lock);
    }
}

int rk_server_send(rk_server *server, uint32_t rank, const char *header, const char *payload, size_t length,
                   int *err) {
    rk_slink *link = &server->links[rank];
    struct iovec iov[2] = {{(char *)header, RK_HEADER_SIZE}, {(char *)payload, length}};
    pthread_mutex_lock(&link->send_lock);
    int rc = rk_send_all(&link->stream, iov, length ? 2 : 1, err);
    pthread_mutex_unlock(&link->send_lock);
    return rc;
}

/* ---- a push ------------------------------------------------------------------------- */
static int worker_bit(const uint64_t *bits, uint32_t rank) {
    return (int)((bits[rank / 64] >> (rank % 64)) & 1);
}

/* Why chunk refuses this push now (its lock held), or 0; *limit gets what the refusal names. */
static int refusal(rk_server *server, rk_schunk *chunk, const rk_header *h, uint32_t rank, uint64_t *limit) {
    int no_data = (h->flags & RK_FLAG_NO_DATA) != 0;
    int broadcast = (h->flags & RK_FLAG_BROADCAST) != 0;
    if (atomic_load(&chunk->key->refused)) return RK_REFUSE_KEY_FAILED;
    if (atomic_load(&server->departed)) return RK_REFUSE_DEPARTED;
    if (!((atomic_load(&chunk->key->declared_by[rank / 64]) >> (rank % 64)) & 1)) return RK_REFUSE_UNDECLARED;
    *limit = h->dtype == chunk->dtype ? chunk->round : chunk->dtype;
    if (h->dtype != chunk->dtype) return RK_REFUSE_DTYPE;
    if (h->round != chunk->round) return RK_REFUSE_ROUND;
    if (worker_bit(chunk->pushed, rank)) return RK_REFUSE_TWICE;
    if (chunk->pushes && broadcast != ((chunk->flags & RK_FLAG_BROADCAST) != 0)) return RK_REFUSE_MIXED;
    if (!no_data && chunk->has_data && broadcast) return RK_REFUSE_TWO_ROOTS;
    return 0;
}

/* Tell the control plane why a push was refused (a failed key's workers were told
 * when it failed); RK_OK, RK_ERR_REFUSED (the link stops), or the mailbox's error. */
static int report_refusal(rk_slink *link, int refused, const rk_header *h, uint64_t limit) {
    if (refused == RK_REFUSE_KEY_FAILED) return RK_OK;
    rk_event *event = rk_event_new(link->rank, RK_EVENT_REFUSED, refused, 0, h, limit);
    int rc = event ? rk_mailbox_post_bounded(&link->server->mailbox, event, &link->stream) : RK_ERR_NO_MEMORY;
    return rc ? rc : refused == RK_REFUSE_UNDECLARED ? RK_ERR_REFUSED : RK_OK;
}

/* Asynchronous mode: why chunk refuses this push now (its lock held), or 0.  A
 * worker that left stops only broadcasts, the one step that waits for everyone. */
static int async_refusal(rk_server *server, rk_schunk *chunk, const rk_header *h, uint32_t rank, uint64_t *limit) {
    int broadcast = (h->flags & RK_FLAG_BROADCAST) != 0;
    if (atomic_load(&chunk->key->refused)) return RK_REFUSE_KEY_FAILED;
    if (!((atomic_load(&chunk->key->declared_by[rank / 64]) >> (rank % 64)) & 1)) return RK_REFUSE_UNDECLARED;
    *limit = h->dtype == chunk->dtype ? chunk->rounds[rank] : chunk->dtype;
    if (h->dtype != chunk->dtype) return RK_REFUSE_DTYPE;
    if (h->round != chunk->rounds[rank]) return RK_REFUSE_ROUND;
    /* (Its broadcast's reply is written into its snapshot by whichever worker comes last.) */
    if (worker_bit(chunk->pushed, rank)) return broadcast ? RK_REFUSE_TWICE : RK_REFUSE_BROADCAST_OPEN;
    if (!broadcast) return 0;
    if (atomic_load(&server->departed)) return RK_REFUSE_DEPARTED;
    if (!(h->flags & RK_FLAG_NO_DATA) && chunk->has_data) return RK_REFUSE_TWO_ROOTS;
    return 0;
}

/* Asynchronous mode: wait (holding no lock) until the worker's replies from its
 * snapshot of chunk have left: RK_OK, RK_STOPPED, or RK_ERR_UNREAD when it left
 * one unread for the stream's timeout (it stops this link only). */
static int wait_snapshot_sent(rk_slink *link, rk_schunk *chunk) {
    _Atomic uint32_t *unsent = &chunk->unsent[link->rank];
    double deadline = rk_now() + link->stream.timeout;
    int rc = RK_OK;
    pthread_mutex_lock(&link->lock);
    while (atomic_load(unsent)) {
        if (link->stream.stop) {
            rc = RK_STOPPED;
            break;
        }
        double left = deadline - rk_now();
        if (left <= 0) {
            rc = RK_ERR_UNREAD;
            break;
        }
        struct timespec until;
        rk_realtime_in(&until, left < 0.1 ? left : 0.1);   /* re-check the stop flag */
        pthread_cond_timedwait(&link->sent, &link->lock, &until);
    }
    pthread_mutex_unlock(&link->lock);
    return rc;
}

/* Asynchronous mode: apply a push (its payload in the link's scratch) and answer
 * its worker; a broadcast's part waits for the others'. */
static int take_async_push(rk_slink *link, rk_schunk *chunk, const rk_header *h) {
    rk_server *server = link->server;
    uint32_t rank = link->rank;
    int broadcast = (h->flags & RK_FLAG_BROADCAST) != 0;
    int with_data = !(h->flags & RK_FLAG_NO_DATA) && chunk->nbytes;   /* a push without data: a pull */
    int with_optimizer = atomic_load(&server->optimizer) && !broadcast;
    uint64_t limit = 0;
    uint64_t *answered = NULL;    /* a completed broadcast: each worker's round */
    int refused;
    for (;;) {
        pthread_mutex_lock(&chunk->lock);
        refused = async_refusal(server, chunk, h, rank, &limit);
        /* A worker waits for a reply before its next push of the chunk: only one
         * that does not read them finds the last still unsent, and waits here. */
        if (refused || atomic_load(&chunk->unsent[rank]) == 0) break;
        pthread_mutex_unlock(&chunk->lock);
        int rc = wait_snapshot_sent(link, chunk);
        if (rc) return rc;
    }
    if (!refused && !broadcast) {
        chunk->rounds[rank]++;
        atomic_fetch_add(&chunk->unsent[rank], 1);   /* answered by us, or by the optimizer's reply_one */
        if (with_optimizer) {
            /* The control plane applies it (RK_EVENT_PUSHED), holding this lock, and
             * answers from the same buffer. */
            if (with_data) memcpy(snapshot_of(chunk, rank), link->scratch, chunk->nbytes);
        } else if (chunk->nbytes) {
            size_t itemsize = 1;
            rk_add_fn add = rk_adder(chunk->dtype, &itemsize);   /* declarations carry only known dtypes */
            if (with_data) add(chunk->buffers[0], link->scratch, chunk->nbytes / itemsize);
            memcpy(snapshot_of(chunk, rank), chunk->buffers[0], chunk->nbytes);
        }
    } else if (!refused) {
        chunk->rounds[rank]++;
        if (!(h->flags & RK_FLAG_NO_DATA)) {
            if (with_data) memcpy(chunk->buffers[0], link->scratch, chunk->nbytes);
            chunk->has_data = 1;
        }
        if (chunk->pushes == 0) {
            chunk->opened = rk_now();
            chunk->reported = 0;
        }
        chunk->pushed[rank / 64] |= 1ull << (rank % 64);
        if (++chunk->pushes == server->num_workers) {
            if (!chunk->has_data) {
                refused = RK_REFUSE_NO_ROOT;
            } else {
                answered = malloc(server->num_workers * sizeof *answered);
                if (answered == NULL) {
                    pthread_mutex_unlock(&chunk->lock);
                    return RK_ERR_NO_MEMORY;
                }
                for (uint32_t r = 0; r < server->num_workers; r++) {
                    answered[r] = chunk->rounds[r] - 1;   /* its broadcast part was its last push */
                    /* (It had waited for its earlier replies to leave before its part counted.) */
                    if (chunk->nbytes) memcpy(snapshot_of(chunk, r), chunk->buffers[0], chunk->nbytes);
                    atomic_fetch_add(&chunk->unsent[r], 1);
                }
            }
            memset(chunk->pushed, 0, server->words * sizeof *chunk->pushed);
            chunk->pushes = 0;
            chunk->has_data = 0;
        }
    }
    pthread_mutex_unlock(&chunk->lock);
    if (refused) return report_refusal(link, refused, h, limit);
    if (answered) {
        for (uint32_t r = 0; r < server->num_workers; r++)
            rk_server_reply_one(server, chunk, r, answered[r], h->priority);
        free(answered);
    } else if (with_optimizer) {
        rk_event *event = rk_event_new(rank, RK_EVENT_PUSHED, 0, 0, h, 0);
        int rc = event ? rk_mailbox_post_bounded(&server->mailbox, event, &link->stream) : RK_ERR_NO_MEMORY;
        if (rc) return rc;
    } else if (!broadcast) {
        rk_server_reply_one(server, chunk, rank, h->round, h->priority);
    }
    return RK_OK;
}

/* A push of a declared chunk, of the declared size (the header is read); `in_place`:
 * a co-located worker added it into the shared sum itself, and no bytes follow. */
static int take_push(rk_slink *link, rk_schunk *chunk, const rk_header *h, int in_place, int *err) {
    rk_server *server = link->server;
    if (h->shared & RK_PLACE_RESULT) {
        char place[RK_PLACE_RESULT_SIZE];
        int rc = rk_recv_all(&link->stream, place, sizeof place, 0, err);
        if (rc) return rc;
        pthread_mutex_lock(&link->lock);
        rk_place *mine = &chunk->places[link->rank];
        memcpy(&mine->addr, place, 8);
        memcpy(&mine->rkey, place + 8, 4);
        mine->round = h->round;
        pthread_mutex_unlock(&link->lock);
    }
    if (h->length && !in_place) {
        if (link->scratch_size < h->length) {
            char *grown = realloc(link->scratch, h->length);
            if (grown == NULL) return RK_ERR_NO_MEMORY;
            link->scratch = grown;
            link->scratch_size = h->length;
        }
        int rc = rk_recv_all(&link->stream, link->scratch, h->length, 0, err);
        if (rc) return rc;
    }
    if (chunk->rounds) return take_async_push(link, chunk, h);   /* (snapshots is NULL for an empty chunk) */
    uint64_t limit = 0;
    uint64_t round = 0;
    int complete = 0;
    pthread_mutex_lock(&chunk->lock);
    int refused = refusal(server, chunk, h, link->rank, &limit);
    if (!refused && !(h->flags & (RK_FLAG_NO_DATA | RK_FLAG_VIA_HOST))) {
        if (h->length && !in_place) {
            uint32_t flags = chunk->flags;
            chunk->flags = h->flags;      /* a broadcast's root value is never encoded */
            refused = contribute(link, chunk, chunk->buffers[chunk->round % 2], link->scratch, h->length);
            if (refused) chunk->flags = flags;
        }
        if (!refused) chunk->has_data = 1;
    }
    if (!refused) {
        uint64_t *via_host = chunk->via_host + (chunk->round % 2) * server->words;
        if (chunk->pushes == 0) {
            chunk->opened = rk_now();
            chunk->reported = 0;
            memset(via_host, 0, server->words * sizeof *via_host);
        }
        if (h->flags & RK_FLAG_VIA_HOST) via_host[link->rank / 64] |= 1ull << (link->rank % 64);
        chunk->flags = h->flags;
        chunk->pushed[link->rank / 64] |= 1ull << (link->rank % 64);
        complete = ++chunk->pushes == server->num_workers;
        if (complete && !chunk->has_data) {
            refused = RK_REFUSE_NO_ROOT;
        } else if (complete) {
            round = chunk->round++;
            memset(chunk->pushed, 0, server->words * sizeof *chunk->pushed);
            chunk->pushes = 0;
            chunk->has_data = 0;
        }
    }
    pthread_mutex_unlock(&chunk->lock);
    if (refused) return report_refusal(link, refused, h, limit);
    if (!complete) {
        if (h->flags & RK_FLAG_ACK) {
            rk_item received = {.priority = 1 << 30, .ref = chunk, .tag = h->round, .op = RK_OP_RECEIVED};
            reply(link, received);
        }
        return RK_OK;
    }
    if (atomic_load(&server->optimizer) && !(h->flags & RK_FLAG_BROADCAST)) {
        rk_header summed = *h;
        summed.round = round;
        post(server, link->rank, RK_EVENT_SUMMED, 0, 0, &summed, 0);
    } else if (chunk->pulled[round % 2] && !(h->flags & RK_FLAG_BROADCAST)) {
        int parity = (int)(round % 2);
        chunk->pulled_bytes[parity] = rk_codec_encode(&chunk->codec, &chunk->pull_state,
                                                      (const float *)chunk->buffers[parity], chunk->nbytes / 4,
                                                      chunk->pulled[parity]);
        reply_all(server, chunk, round, h->priority, chunk->pulled[parity]);
    } else {
        reply_all(server, chunk, round, h->priority, chunk->buffers[round % 2]);
    }
    return RK_OK;
}

/* Hand the message whose header was read to the control plane and wait for its
 * verdict: with its payload when that is a bounded control payload, else the
 * control plane reads the rest itself. */
static int ask(rk_slink *link, const rk_header *h, int *err) {
    rk_event *event = rk_event_new(link->rank, RK_EVENT_MESSAGE, RK_OK, 0, h, 0);
    if (event == NULL) return RK_ERR_NO_MEMORY;
    /* A control payload is read here, within its bound, so that a worker that
     * trickles one holds up only its own link; the large ones (a starting
     * value, optimizer state, a push the engine cannot place) have limits only
     * the control plane knows, and it reads them itself. */
    if (h->length && h->length <= RK_MAX_CONTROL_BYTES && h->op != RK_OP_PUSH && h->op != RK_OP_INIT &&
        h->op != RK_OP_SET_STATES) {
        event->payload = malloc(h->length);
        int rc = event->payload ? rk_recv_all(&link->stream, event->payload, h->length, 0, err) : RK_ERR_NO_MEMORY;
        if (rc) {
            rk_event_free(event);
            return rc;
        }
    }
    pthread_mutex_lock(&link->verdict_lock);
    link->awaiting = 1;
    pthread_mutex_unlock(&link->verdict_lock);
    rk_mailbox_post(&link->server->mailbox, event);
    pthread_mutex_lock(&link->verdict_lock);
    while (link->awaiting && !__atomic_load_n(&link->stream.stop, __ATOMIC_ACQUIRE)) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 100 * 1000000L;          /* re-check the stop flag */
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&link->verdict_ready, &link->verdict_lock, &until);
    }
    int verdict = link->awaiting ? RK_VERDICT_STOP : link->verdict;
    pthread_mutex_unlock(&link->verdict_lock);
    return verdict == RK_VERDICT_CONTINUE ? RK_OK : RK_ERR_REFUSED;
}

size_t rk_server_take_buffered(rk_server *server, uint32_t rank, char *dst, size_t n) {
    return rk_stream_take_buffered(&server->links[rank].stream, dst, n);
}

void rk_server_answer(rk_server *server, uint32_t rank, int verdict) {
    rk_slink *link = &server->links[rank];
    pthread_mutex_lock(&link->verdict_lock);
    link->verdict = verdict;
    link->awaiting = 0;
    pthread_cond_signal(&link->verdict_ready);
    pthread_mutex_unlock(&link->verdict_lock);
}

/* ask() about a push flagged RK_PLACE_RESULT, once the place that follows its header is read. */
static int drop_place_then_ask(rk_slink *link, rk_header *h, int *err) {
    char place[RK_PLACE_RESULT_SIZE];
    int rc = rk_recv_all(&link->stream, place, sizeof place, 0, err);
    if (rc) return rc;
    h->shared = 0;
    return ask(link, h, err);
}

static void *reader_main(void *arg) {
    rk_slink *link = arg;
    rk_server *server = link->server;
    rk_header h;
    for (;;) {
        int err = 0, have_header = 0;
        int rc = rk_read_header(&link->stream, &h, &have_header, &err);
        if (rc == RK_OK) {
            rk_schunk *chunk = h.op == RK_OP_PUSH ? find_chunk(server, h.key, h.chunk) : NULL;
            int sized = chunk && h.length == ((h.flags & (RK_FLAG_NO_DATA | RK_FLAG_VIA_HOST)) ? 0 : chunk->nbytes);
            if (chunk && chunk->compressed && !(h.flags & RK_FLAG_BROADCAST))
                sized = (h.length > 0 || chunk->nbytes == 0) && h.length <= chunk->max_encoded && !h.shared &&
                        !(h.flags & RK_FLAG_VIA_HOST);
            if (h.flags & RK_FLAG_VIA_HOST) {
                /* Only a plain pushpull of a worker the plan has push through its host's root. */
                int planned = sized && !h.shared && atomic_load(&link->via_host) && chunk->nbytes &&
                              !chunk->rounds && !(h.flags & ~(RK_FLAG_ACK | RK_FLAG_VIA_HOST));
                rc = planned ? take_push(link, chunk, &h, 0, &err) : RK_ERR_VIA_HOST;
            } else if (h.shared == RK_PLACE_RESULT && link->stream.verbs && h.op == RK_OP_PUSH) {
                /* A push that says where its result goes.  One of a chunk the engine does not
                 * hold (its key refused, or not declared here) goes to the control plane as an
                 * unflagged push would, its place dropped: no result is placed for it. */
                rc = sized ? take_push(link, chunk, &h, 0, &err)
                     : chunk == NULL ? drop_place_then_ask(link, &h, &err) : RK_ERR_SHARED;
            } else if (h.shared && link->stream.verbs) {
                rc = RK_ERR_SHARED;       /* only a push may name a place */
            } else if (h.shared) {
                /* Only a push added into a sum this worker was offered comes flagged. */
                int offered = sized && h.shared == RK_IN_PLACE && chunk->shared && h.length &&
                              !(h.flags & ~RK_FLAG_ACK) && has_segment(link, chunk->segments[0]) &&
                              has_segment(link, chunk->segments[1]);
                rc = offered ? take_push(link, chunk, &h, 1, &err) : RK_ERR_SHARED;
            } else {
                rc = sized ? take_push(link, chunk, &h, 0, &err) : ask(link, &h, &err);
            }
        }
        if (rc == RK_STOPPED || __atomic_load_n(&link->stream.stop, __ATOMIC_ACQUIRE)) break;   /* closed here */
        if (rc != RK_OK) {
            if (rc != RK_ERR_REFUSED)     /* else the control plane knows why already */
                post(server, link->rank, RK_EVENT_CLOSED, rc, err, have_header ? &h : NULL, 0);
            break;
        }
    }
    atomic_store(&link->active, 0);
    return NULL;
}

/* ---- the control plane's queries ------------------------------------------------------- */
uint32_t rk_server_stale_rounds(rk_server *server, double patience, uint64_t *pairs, uint64_t *pushed,
                                uint64_t *rounds, uint32_t max) {
    uint32_t found = 0;
    double now = rk_now();
    pthread_rwlock_rdlock(&server->table_lock);
    rk_schunk *declared = server->declared;
    pthread_rwlock_unlock(&server->table_lock);
    for (rk_schunk *c = declared; c && found < max; c = c->next_declared) {
        pthread_mutex_lock(&c->lock);
        if (c->pushes && !c->reported && now - c->opened >= patience) {
            c->reported = 1;
            pairs[2 * found] = c->key->wire;
            pairs[2 * found + 1] = c->index;
            memcpy(pushed + (size_t)found * server->words, c->pushed, server->words * sizeof *pushed);
            for (uint32_t r = 0; r < server->num_workers; r++)   /* a part is its worker's last push */
                rounds[(size_t)found * server->num_workers + r] = c->rounds ? c->rounds[r] - 1 : c->round;
            found++;
        }
        pthread_mutex_unlock(&c->lock);
    }
    return found;
}

int rk_server_key_has_pushes(rk_skey *key) {
    int any = 0;
    for (rk_schunk *c = key->chunks; c && !any; c = c->next_in_key) {
        pthread_mutex_lock(&c->lock);
        any = c->pushes != 0;
        pthread_mutex_unlock(&c->lock);
    }
    return any;
}

rk_event *rk_server_next_event(rk_server *server, double timeout) {
    return rk_mailbox_next(&server->mailbox, timeout);
}

/* ---- lifetime ----------------------------------------------------------------------- */
rk_server *rk_server_new(uint32_t num_workers, double timeout, uint64_t direct_bytes) {
    rk_server *server = calloc(1, sizeof *server);
    if (server == NULL) return NULL;
    server->links = calloc(num_workers ? num_workers : 1, sizeof *server->links);
    if (server->links == NULL) {
        free(server);
        return NULL;
    }
    server->num_workers = num_workers;
    server->words = (num_workers + 63) / 64 ? (num_workers + 63) / 64 : 1;
    server->direct_bytes = direct_bytes;
    server->pid = getpid();
    pthread_rwlock_init(&server->table_lock, NULL);
    rk_mailbox_init(&server->mailbox);
    for (uint32_t rank = 0; rank < num_workers; rank++) {
        rk_slink *link = &server->links[rank];
        link->server = server;
        link->rank = rank;
        link->stream.fd = -1;
        link->stream.timeout = timeout;
        pthread_mutex_init(&link->lock, NULL);
        pthread_cond_init(&link->ready, NULL);
        pthread_cond_init(&link->sent, NULL);
        pthread_mutex_init(&link->send_lock, NULL);
        pthread_mutex_init(&link->verdict_lock, NULL);
        pthread_cond_init(&link->verdict_ready, NULL);
    }
    return server;
}

int rk_server_start_link(rk_server *server, uint32_t rank, int fd, const rk_rings *rings, struct rk_verbs *verbs) {
    rk_slink *link = &server->links[rank];
    if (link->started) return EBUSY;
    int rc = rk_stream_open(&link->stream, fd, rings, verbs, link->stream.timeout);
    if (rc) return rc;
    atomic_store(&link->active, 1);
    rc = pthread_create(&link->replier, NULL, replier_main, link);
    if (rc) {
        atomic_store(&link->active, 0);
        return rc;
    }
    rc = pthread_create(&link->reader, NULL, reader_main, link);
    if (rc) {
        atomic_store(&link->active, 0);
        pthread_mutex_lock(&link->lock);
        __atomic_store_n(&link->stream.stop, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&link->ready);
        pthread_mutex_unlock(&link->lock);
        pthread_join(link->replier, NULL);
        return rc;
    }
    link->started = 1;
    return 0;
}

void rk_server_close(rk_server *server) {
    if (server->closed) return;   /* the descriptors may be another socket's by now */
    server->closed = 1;
    if (getpid() != server->pid) return;   /* a forked child: the threads and sockets are the parent's */
    for (uint32_t rank = 0; rank < server->num_workers; rank++) {
        rk_slink *link = &server->links[rank];
        atomic_store(&link->active, 0);
        pthread_mutex_lock(&link->lock);
        __atomic_store_n(&link->stream.stop, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&link->ready);
        pthread_cond_broadcast(&link->sent);
        pthread_mutex_unlock(&link->lock);
        pthread_mutex_lock(&link->verdict_lock);
        pthread_cond_broadcast(&link->verdict_ready);
        pthread_mutex_unlock(&link->verdict_lock);
        if (link->started) rk_stream_wake(&link->stream);
    }
    for (uint32_t rank = 0; rank < server->num_workers; rank++) {
        rk_slink *link = &server->links[rank];
        if (link->started) {
            rk_join(link->reader);
            rk_join(link->replier);
            link->started = 0;
        }
        rk_stream_retire(&link->stream, &link->send_lock);
    }
    rk_mailbox_close(&server->mailbox);
}

void rk_server_free(rk_server *server) {
    if (server == NULL) return;
    rk_server_close(server);
    for (uint32_t rank = 0; rank < server->num_workers; rank++) {
        rk_queue_free(&server->links[rank].queue);
        rk_stream_free(&server->links[rank].stream);
        free(server->links[rank].scratch);
    }
    rk_mailbox_free(&server->mailbox);
    rk_schunk *chunk = server->declared;
    while (chunk) {
        rk_schunk *next = chunk->next_declared;
        free_chunk(chunk);
        chunk = next;
    }
    rk_skey *key = server->keys;
    while (key) {
        rk_skey *next = key->next;
        free(key->declared_by);
        free(key);
        key = next;
    }
    rk_table_free(&server->table);
    free(server->links);
    free(server);
}

int rk_server_set_codec(rk_schunk *chunk, const struct rk_codec *codec) {
    size_t count = chunk->nbytes / 4;
    chunk->codec = *codec;
    chunk->max_encoded = rk_codec_max_bytes(codec, count);
    if (rk_codec_compresses_pull(codec)) {
        if (rk_codec_state_init(codec, &chunk->pull_state, count, chunk->index)) return -1;
        for (int parity = 0; parity < 2; parity++)
            if ((chunk->pulled[parity] = malloc(chunk->max_encoded ? chunk->max_encoded : 1)) == NULL) return -1;
    }
    chunk->compressed = 1;
    return 0;
}
