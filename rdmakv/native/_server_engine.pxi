# The server's native engine (server_engine.h, server_engine.c): ownership and
# the GIL.  ServerEngine owns the rk_server; a ServerChunk keeps the round
# buffers it was given for as long as the engine lives.  Policy (what a
# refusal says, what an odd message means) stays in rdmakv/server/server.py.

cdef extern from "server_engine.h" nogil:
    ctypedef struct rk_server:
        pass
    ctypedef struct rk_skey:
        pass
    ctypedef struct rk_schunk:
        pass
    rk_server *rk_server_new(uint32_t num_workers, double timeout, uint64_t direct_bytes)
    int rk_server_start_link(rk_server *server, uint32_t rank, int fd, const rk_rings *rings, rk_verbs *verbs)
    void rk_server_link_has_segment(rk_server *server, uint32_t rank, uint32_t number)
    void rk_server_set_spin(rk_server *server, double seconds)
    void rk_server_close(rk_server *server)
    void rk_server_free(rk_server *server)
    rk_skey *rk_server_add_key(rk_server *server, uint64_t wire)
    int rk_server_set_codec(rk_schunk *chunk, const rk_codec *codec)
    rk_schunk *rk_server_add_chunk(rk_server *server, rk_skey *key, uint32_t index, uint8_t dtype, uint64_t nbytes,
                                   char *buffer0, char *buffer1, const uint64_t *places)
    rk_schunk *rk_server_add_async_chunk(rk_server *server, rk_skey *key, uint32_t index, uint8_t dtype,
                                         uint64_t nbytes, char *stored, char *snapshots)
    void rk_server_set_value(rk_schunk *chunk, const char *data)
    void rk_server_hold_chunk(rk_schunk *chunk)
    void rk_server_release_chunk(rk_schunk *chunk)
    void rk_server_declared_by(rk_skey *key, uint32_t rank)
    void rk_server_refuse_key(rk_skey *key)
    void rk_server_departed(rk_server *server)
    void rk_server_set_optimizer(rk_server *server, int on)
    void rk_server_allow_via_host(rk_server *server, uint32_t rank)
    void rk_server_reply_all(rk_server *server, rk_schunk *chunk, uint64_t round, int32_t priority, const char *data)
    void rk_server_reply_one(rk_server *server, rk_schunk *chunk, uint32_t rank, uint64_t round, int32_t priority)
    int rk_server_send(rk_server *server, uint32_t rank, const char *header, const char *payload, size_t length,
                       int *err)
    size_t rk_server_take_buffered(rk_server *server, uint32_t rank, char *dst, size_t n)
    void rk_server_answer(rk_server *server, uint32_t rank, int verdict)
    rk_event *rk_server_next_event(rk_server *server, double timeout)
    uint32_t rk_server_stale_rounds(rk_server *server, double patience, uint64_t *pairs, uint64_t *pushed,
                                    uint64_t *rounds, uint32_t max)
    int rk_server_key_has_pushes(rk_skey *key)
    uint32_t rk_server_words_per_chunk(rk_server *server)
    void rk_server_link_wire_bytes(rk_server *server, uint32_t rank, uint64_t *out)


VERDICT_CONTINUE, VERDICT_STOP = 1, 2
# enum rk_refusal, for rdmakv/server/server.py's messages
(REFUSE_KEY_FAILED, REFUSE_DEPARTED, REFUSE_DTYPE, REFUSE_ROUND, REFUSE_TWICE, REFUSE_MIXED, REFUSE_TWO_ROOTS,
 REFUSE_NO_ROOT, REFUSE_UNDECLARED, REFUSE_SUM_STALLED, REFUSE_ENCODING, REFUSE_BROADCAST_OPEN) = range(1, 13)


cdef class ServerKey:
    cdef rk_skey *key


cdef class ServerChunk:
    cdef rk_schunk *chunk
    cdef object buffers               # the round buffers the engine sums into: held as long as it lives
    cdef Py_ssize_t nbytes


cdef class ServerEngine:
    """The server's native data plane over TCP worker links (server_engine.h)."""
    cdef rk_server *server
    cdef bint closed
    cdef list chunks                  # every ServerChunk: their buffers outlive the engine's threads
    cdef uint32_t num_workers
    cdef list channels                # shared-memory channels and verbs streams its links borrow

    def __cinit__(self, uint32_t num_workers, double timeout, uint64_t direct_bytes):
        self.server = rk_server_new(num_workers, timeout, direct_bytes)
        if self.server == NULL:
            raise MemoryError("the server's native engine could not be allocated")
        self.chunks = []
        self.channels = []
        self.num_workers = num_workers

    cdef _check_rank(self, uint32_t rank):
        if rank >= self.num_workers:
            raise ValueError(f"worker rank {rank} of a job of {self.num_workers}")

    def set_spin(self, double seconds):
        """Readers poll for `seconds` for a worker's next message before sleeping (call before start_link)."""
        rk_server_set_spin(self.server, seconds)

    def start_link(self, uint32_t rank, int fd, stream=None):
        """Run worker rank's link over the TCP socket fd, over a shared-memory
        channel's rings (stream: a ShmChannel) with fd the Unix socket beside
        them, or over a VerbsStream with fd its side channel; all stay the
        caller's, to close (and unmap, release) only after close()."""
        self._check_rank(rank)
        cdef rk_rings rings
        cdef const rk_rings *over = _rings_of(stream if isinstance(stream, ShmChannel) else None, &rings)
        cdef rk_verbs *verbs = _verbs_of(stream)
        self.channels.append(stream)            # its memory outlives our threads
        cdef int rc = rk_server_start_link(self.server, rank, fd, over, verbs)
        if rc:
            raise OSError(rc, f"starting the engine's threads for worker {rank}: {__import__('os').strerror(rc)}")

    def add_key(self, uint64_t wire):
        cdef ServerKey key = ServerKey.__new__(ServerKey)
        key.key = rk_server_add_key(self.server, wire)
        if key.key == NULL:
            raise MemoryError("declaring a key to the server's native engine")
        return key

    def add_chunk(self, ServerKey key not None, uint32_t index, uint8_t dtype_code, buffer0, buffer1, places=None):
        """Sum the chunk's rounds into buffer0 (even rounds) and buffer1 (odd), writable and of one size.
        places: None, or the buffers' ((segment, offset), (segment, offset)) in shared memory
        files, whose sums co-located workers add into too."""
        cdef unsigned char[::1] first = buffer0
        cdef unsigned char[::1] second = buffer1
        cdef uint64_t where[4]
        if first.shape[0] != second.shape[0]:
            raise ValueError("the round buffers of a chunk differ in size")
        if places is not None:
            (where[0], where[1]), (where[2], where[3]) = places
            if where[1] < RDMAKV_SUM_CONTROL or where[3] < RDMAKV_SUM_CONTROL:
                raise ValueError("a shared sum needs its control block before it")
        cdef ServerChunk chunk = ServerChunk.__new__(ServerChunk)
        chunk.buffers = (buffer0, buffer1)
        chunk.nbytes = first.shape[0]
        chunk.chunk = rk_server_add_chunk(self.server, key.key, index, dtype_code, first.shape[0],
                                          <char *>&first[0] if first.shape[0] else NULL,
                                          <char *>&second[0] if second.shape[0] else NULL,
                                          where if places is not None else NULL)
        if chunk.chunk == NULL:
            raise MemoryError("declaring a chunk to the server's native engine")
        self.chunks.append(chunk)
        return chunk

    def wire_bytes(self, uint32_t rank):
        """(bytes sent, bytes received) of whole frames on worker rank's link since the engine took it."""
        cdef uint64_t counts[2]
        self._check_rank(rank)
        rk_server_link_wire_bytes(self.server, rank, counts)
        return counts[0], counts[1]

    def set_codec(self, ServerChunk chunk not None, Codec codec not None):
        """Compressed pushpulls for a chunk added with add_chunk (float32, private buffers),
        before any worker's declaration of it is answered."""
        if rk_server_set_codec(chunk.chunk, &codec.c):
            raise MemoryError("codec buffers of a chunk")

    def add_async_chunk(self, ServerKey key not None, uint32_t index, uint8_t dtype_code, stored, snapshots):
        """Asynchronous mode: apply each push to stored (writable) as it arrives and answer its
        worker from its part of snapshots (writable, num_workers times stored's size)."""
        cdef unsigned char[::1] value = stored
        cdef unsigned char[::1] copies = snapshots
        if copies.shape[0] != value.shape[0] * self.num_workers:
            raise ValueError(f"snapshots of {copies.shape[0]} bytes for {self.num_workers} workers and a chunk "
                             f"of {value.shape[0]}")
        cdef ServerChunk chunk = ServerChunk.__new__(ServerChunk)
        chunk.buffers = (stored, snapshots)
        chunk.nbytes = value.shape[0]
        chunk.chunk = rk_server_add_async_chunk(self.server, key.key, index, dtype_code, value.shape[0],
                                                <char *>&value[0] if value.shape[0] else NULL,
                                                <char *>&copies[0] if copies.shape[0] else NULL)
        if chunk.chunk == NULL:
            raise MemoryError("declaring a chunk to the server's native engine")
        self.chunks.append(chunk)
        return chunk

    def set_value(self, ServerChunk chunk not None, data):
        """Asynchronous mode: replace the chunk's stored value with data (a starting value)."""
        cdef const unsigned char[::1] view = data
        if view.shape[0] != chunk.nbytes:
            raise ValueError(f"a value of {view.shape[0]} bytes for a chunk of {chunk.nbytes}")
        if view.shape[0]:
            with nogil:
                rk_server_set_value(chunk.chunk, <const char *>&view[0])

    def hold(self, ServerChunk chunk not None):
        """Asynchronous mode: take the chunk's lock (the engine's threads wait; they never
        need the GIL), to change its stored value; release() gives it back."""
        with nogil:
            rk_server_hold_chunk(chunk.chunk)

    def release(self, ServerChunk chunk not None):
        rk_server_release_chunk(chunk.chunk)

    def reply_one(self, ServerChunk chunk not None, uint32_t rank, uint64_t round, int32_t priority):
        """Asynchronous mode: RESULT of chunk's round to worker rank from its snapshot (set by the caller)."""
        self._check_rank(rank)
        with nogil:
            rk_server_reply_one(self.server, chunk.chunk, rank, round, priority)

    def link_has_segment(self, uint32_t rank, uint32_t number):
        """Worker rank has our shared memory file `number` (passed to it)."""
        self._check_rank(rank)
        rk_server_link_has_segment(self.server, rank, number)

    def declared_by(self, ServerKey key not None, uint32_t rank):
        self._check_rank(rank)
        rk_server_declared_by(key.key, rank)

    def refuse_key(self, ServerKey key not None):
        rk_server_refuse_key(key.key)

    def departed(self):
        rk_server_departed(self.server)

    def set_optimizer(self, bint on):
        rk_server_set_optimizer(self.server, on)

    def allow_via_host(self, uint32_t rank):
        """One push per host: worker rank pushes plain pushpulls through its host's root."""
        self._check_rank(rank)
        rk_server_allow_via_host(self.server, rank)

    def reply_all(self, ServerChunk chunk not None, uint64_t round, int32_t priority, data):
        """RESULT of chunk's round to every worker, from data (which must stay as it is
        until every worker has it: the chunk's weight, updated only in a later round)."""
        cdef const unsigned char[::1] view = data
        if view.shape[0] != chunk.nbytes:
            raise ValueError(f"a result of {view.shape[0]} bytes for a chunk of {chunk.nbytes}")
        with nogil:
            rk_server_reply_all(self.server, chunk.chunk, round, priority,
                                <const char *>&view[0] if view.shape[0] else NULL)

    def send(self, uint32_t rank, header, payload=None):
        """(enum rk_error, errno) of sending header and payload to worker rank: (0, 0) when sent."""
        cdef Py_buffer hview
        cdef Py_buffer pview
        cdef int rc
        cdef int err = 0
        cdef size_t length = 0
        cdef const char *data = NULL
        self._check_rank(rank)
        PyObject_GetBuffer(header, &hview, PyBUF_SIMPLE)
        try:
            if hview.len != RK_HEADER_SIZE:
                raise ValueError(f"a header is {RK_HEADER_SIZE} bytes, not {hview.len}")
            if payload is not None:
                PyObject_GetBuffer(payload, &pview, PyBUF_ANY_CONTIGUOUS)
                length, data = pview.len, <const char *>pview.buf
            try:
                with nogil:
                    rc = rk_server_send(self.server, rank, <const char *>hview.buf, data, length, &err)
            finally:
                if payload is not None:
                    PyBuffer_Release(&pview)
        finally:
            PyBuffer_Release(&hview)
        return rc, err

    def take_buffered(self, uint32_t rank, buffer):
        """Bytes of the waiting message's payload the engine read ahead, moved into
        the start of buffer (writable); how many.  Only while it waits for a verdict."""
        cdef unsigned char[::1] view = buffer
        self._check_rank(rank)
        if view.shape[0] == 0:
            return 0
        return rk_server_take_buffered(self.server, rank, <char *>&view[0], view.shape[0])

    def answer(self, uint32_t rank, int verdict):
        self._check_rank(rank)
        rk_server_answer(self.server, rank, verdict)

    def next_event(self, double timeout):
        cdef rk_event *event
        with nogil:
            event = rk_server_next_event(self.server, timeout)
        return _event_tuple(event)

    def stale_rounds(self, double patience, uint32_t max_rounds=64):
        """[(wire, chunk, {rank that pushed: the round its push belongs to})] of rounds open
        for patience seconds (in asynchronous mode, a broadcast's: each worker has its own
        round), each once."""
        cdef uint32_t words = rk_server_words_per_chunk(self.server)
        cdef uint32_t workers = self.num_workers
        cdef uint64_t *pairs = <uint64_t *>malloc(2 * max_rounds * sizeof(uint64_t))
        cdef uint64_t *pushed = <uint64_t *>malloc(words * max_rounds * sizeof(uint64_t))
        cdef uint64_t *rounds = <uint64_t *>malloc(max(workers, 1) * max_rounds * sizeof(uint64_t))
        cdef uint32_t found
        try:
            if pairs == NULL or pushed == NULL or rounds == NULL:
                raise MemoryError("listing stale rounds")
            with nogil:             # a chunk's lock may be held while its shared sum's lock is awaited
                found = rk_server_stale_rounds(self.server, patience, pairs, pushed, rounds, max_rounds)
            return [(pairs[2 * i], pairs[2 * i + 1],
                     {rank: rounds[i * workers + rank] for rank in range(workers)
                      if (pushed[i * words + rank // 64] >> (rank % 64)) & 1})
                    for i in range(found)]
        finally:
            free(pairs)
            free(pushed)
            free(rounds)

    def key_has_pushes(self, ServerKey key not None):
        cdef int any_pushes
        with nogil:                 # (see stale_rounds)
            any_pushes = rk_server_key_has_pushes(key.key)
        return bool(any_pushes)

    def close(self):
        """Stop the engine's threads (idempotent)."""
        if self.closed:
            return
        self.closed = True
        with nogil:
            rk_server_close(self.server)

    def __dealloc__(self):
        if self.server != NULL:
            with nogil:
                rk_server_free(self.server)
            self.server = NULL
