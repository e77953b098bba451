# The worker's native engine (worker_engine.h, worker_engine.c): ownership and the GIL.
# Engine owns the rk_engine; Operation owns an rk_op and the buffer exports it
# points at, and the engine holds a reference to it from submit() until the op
# comes back from rk_engine_take_finished() (reap()), so no native thread ever
# touches memory Python has let go.  Policy (names, messages, errors) stays in
# rdmakv/worker/ (engine_link.py, handles.py, kvstore.py).

cdef extern from "worker_engine.h" nogil:
    ctypedef struct rk_engine:
        pass
    ctypedef struct rk_key:
        pass
    ctypedef struct rk_op:
        uint64_t round
        int32_t outcome
        uint32_t failed_link
        void *owner
        rk_op *next
    ctypedef void (*rk_done_fn)(rk_op *op) noexcept nogil
    ctypedef void (*rk_complete_fn)(void *engine, void *param, const void *error) noexcept nogil

    rk_engine *rk_engine_new(uint32_t num_links, uint64_t credit_bytes, uint64_t small_bytes, double timeout,
                             uint32_t sender_rank)
    int rk_engine_start_link(rk_engine *engine, uint32_t index, int fd, const rk_rings *rings, rk_verbs *verbs)
    uint64_t rk_link_summed_bytes(rk_engine *engine, uint32_t link)
    void rk_link_wire_bytes(rk_engine *engine, uint32_t link, uint64_t *out)
    void rk_engine_set_spin(rk_engine *engine, double seconds)
    void rk_engine_close(rk_engine *engine)
    void rk_engine_free(rk_engine *engine)
    rk_key *rk_engine_add_key(rk_engine *engine, uint64_t wire, uint32_t order, uint8_t dtype, uint32_t nchunks,
                              const uint64_t *offsets, const uint64_t *sizes, const uint32_t *links,
                              char *const *host_sums)
    void rk_engine_set_host(rk_engine *engine, int role, uint32_t others, const uint8_t *via)
    enum:
        RK_HOST_ROOT
        RK_HOST_MEMBER
    void rk_engine_fail_key(rk_engine *engine, rk_key *key)
    int rk_engine_set_codec(rk_key *key, uint32_t index, const rk_codec *codec)
    void rk_op_init(rk_op *op, rk_engine *engine, rk_key *key, const char *source, char *target, int32_t priority,
                    uint32_t flags, void *owner)
    void rk_op_set_keys(rk_op *op, const uint32_t *source_lkeys, const uint32_t *target_rkeys)
    uint32_t RK_ZERO_COPY_BYTES
    uint64_t rk_engine_submit(rk_engine *engine, rk_op *op)
    int rk_op_wait(rk_op *op, double timeout)
    int rk_op_settled(rk_op *op)
    void rk_engine_fail_link(rk_engine *engine, uint32_t link, int32_t outcome)
    int rk_op_want_callback(rk_op *op, rk_done_fn on_done)
    int rk_op_complete_with(rk_op *op, rk_complete_fn complete, void *engine, void *param, rk_done_fn on_failure)
    rk_op *rk_engine_take_finished(rk_engine *engine)
    uint32_t rk_op_owed(rk_op *op, uint32_t link, uint32_t *indices, uint32_t max)
    int rk_link_send(rk_engine *engine, uint32_t link, const char *header, const char *payload, size_t length,
                     int *err)
    void rk_link_allow_states(rk_engine *engine, uint32_t link, uint64_t limit)
    rk_event *rk_engine_next_event(rk_engine *engine, double timeout)


ENGINE_ALL_LINKS = 0xFFFFFFFF
cdef int _t_remote_write = v.IBV_ACCESS_LOCAL_WRITE | v.IBV_ACCESS_REMOTE_WRITE
# enum rk_outcome, for rdmakv/worker/kvstore.py's messages
OUTCOME_OK, OUTCOME_LINK_FAILED, OUTCOME_KEY_FAILED, OUTCOME_CANCELLED = 0, 1, 2, 3


cdef void _run_callbacks(rk_op *op) noexcept nogil:
    with gil:
        (<Operation>op.owner)._callbacks_due()


cdef class EngineKey:
    """A key declared to the engine (its chunks and their links); lives as long as the engine."""
    cdef rk_key *key
    cdef readonly Engine engine
    cdef readonly uint64_t nbytes         # what a pushpull's source and target must hold
    cdef tuple zero_copy_links            # links with a chunk of RK_ZERO_COPY_BYTES or more


cdef class Operation:
    """One pushpull in the engine: the rk_op and the buffer exports it reads and writes."""
    cdef rk_op op
    cdef Py_buffer source_view
    cdef Py_buffer target_view
    cdef bint has_source
    cdef bint has_target
    cdef readonly Engine engine
    cdef object _callback_target      # what callbacks are called with (the Handle), while some wait
    cdef list _callbacks
    cdef object _on_failure           # called instead of a native completion if the op fails
    cdef uint32_t *keys               # verbs: per link, source's lkey then (num_links on) target's rkey
    cdef list _pins                   # (MRCache, pin) leases held until the op is reaped

    cdef _register(self, Engine engine, EngineKey key, source, target):
        """Register source and target on the verbs links that move this key's large
        chunks (each link's MRCache, which holds the exports), for zero copy.  A
        link where registering fails (the locked-memory limit) copies instead."""
        cdef uint32_t n = engine.num_links
        for link in key.zero_copy_links:
            cache = engine.registrations[link]
            if cache is None:
                continue
            if self.keys == NULL:
                self.keys = <uint32_t *>calloc(2 * n, sizeof(uint32_t))
                if self.keys == NULL:
                    raise MemoryError("registering a pushpull's buffers")
                self._pins = []
            try:
                into = cache.pin(target, _t_remote_write)
                self._pins.append((cache, into))
                out_of = into if source is None or source is target else cache.pin(source, 0)
                if out_of is not into:
                    self._pins.append((cache, out_of))
            except VerbsError as exc:
                engine.registrations[link] = None
                __import__("logging").getLogger("rdmakv.worker").warning(
                    "link %d copies its payloads from now on: %s", link, exc)
                continue
            self.keys[n + <uint32_t>link] = into[1].rkey
            if source is not None:
                self.keys[<uint32_t>link] = out_of[1].lkey
        if self.keys != NULL:
            rk_op_set_keys(&self.op, self.keys, self.keys + n)

    cdef _unregister(self):
        pins, self._pins = self._pins, None
        for cache, pin in pins or ():
            cache.unpin(pin)

    @property
    def round(self):
        return self.op.round

    def wait(self, double timeout):
        """True once done (callbacks run), False after timeout seconds; the GIL is released."""
        cdef int done
        with nogil:
            done = rk_op_wait(&self.op, timeout)
        return bool(done)

    def done(self):
        return bool(rk_op_wait(&self.op, 0.0))

    def settled(self):
        """Whether the outcome is decided (outcome is then meaningful), done or not."""
        return bool(rk_op_settled(&self.op))

    @property
    def outcome(self):
        """(enum rk_outcome, the failed link); meaningful once callbacks are due or done() is True."""
        return self.op.outcome, self.op.failed_link

    def owed(self, uint32_t link):
        """Indices of this op's chunks whose result link still owes."""
        cdef uint32_t indices[64]
        self.engine._check_link(link)
        cdef uint32_t count = rk_op_owed(&self.op, link, indices, 64)
        return [indices[i] for i in range(min(count, 64))], count

    def add_done_callback(self, fn, target):
        """Call fn(target) once the outcome is known: from the engine thread that
        finishes the op, before waiters are released, or here if it already finished."""
        cdef int state = rk_op_want_callback(&self.op, _run_callbacks)
        if state == 0 or (state == 1 and self._callbacks is not None):
            if self._callbacks is None:
                self._callbacks = []
            self._callbacks.append(fn)
            self._callback_target = target
            return
        fn(target)

    def complete_natively(self, size_t complete, size_t engine, size_t param, on_failure, target):
        """Have the op, if it succeeds, call the C function complete(engine, param, NULL)
        from the engine thread that finishes it, without the GIL (MXNet's on_complete,
        rdmakv/mxnet/engine.py), or from here if it finished already; if it fails, call
        on_failure(target) instead, as a done-callback.  One of the two runs, once."""
        if complete == 0:
            raise ValueError("a native completion needs a function")
        cdef rk_complete_fn fn = <rk_complete_fn>complete
        cdef int state = rk_op_complete_with(&self.op, fn, <void *>engine, <void *>param, _run_callbacks)
        if state < 0:
            raise RuntimeError("this operation has a native completion already")
        if state == 0:        # a failing op's on_done waits for the GIL this thread holds
            self._on_failure = on_failure
            self._callback_target = target
        elif self.op.outcome == OUTCOME_OK:
            with nogil:
                fn(<void *>engine, <void *>param, NULL)
        else:
            on_failure(target)

    def _callbacks_due(self):
        callbacks, self._callbacks = self._callbacks or [], None
        if self._on_failure is not None and self.op.outcome != OUTCOME_OK:
            callbacks.insert(0, self._on_failure)
        self._on_failure = None
        target, self._callback_target = self._callback_target, None
        for fn in callbacks:
            try:
                fn(target)
            except Exception:
                __import__("logging").getLogger("rdmakv.worker").exception("a done-callback failed")

    def __dealloc__(self):
        free(self.keys)
        if self.has_source:
            PyBuffer_Release(&self.source_view)
        if self.has_target:
            PyBuffer_Release(&self.target_view)


cdef class Engine:
    """The worker's native data plane over TCP and shared-memory links (worker_engine.h)."""
    cdef rk_engine *engine
    cdef bint closed
    cdef uint32_t num_links
    cdef list channels                # shared-memory channels and verbs streams its links borrow
    cdef readonly list registrations  # per link: the MRCache of a verbs link (zero copy), or None
    cdef list host_memories           # one push per host: the memory of the keys' host sums

    def __cinit__(self, uint32_t num_links, uint64_t credit_bytes, uint64_t small_bytes, double timeout,
                  uint32_t sender_rank):
        self.engine = rk_engine_new(num_links, credit_bytes, small_bytes, timeout, sender_rank)
        if self.engine == NULL:
            raise MemoryError("the native engine could not be allocated")
        self.num_links = num_links
        self.channels = []
        self.registrations = [None] * num_links
        self.host_memories = []

    cdef _check_link(self, uint32_t link):
        if link >= self.num_links:
            raise ValueError(f"link {link} of an engine with {self.num_links}")

    def set_spin(self, double seconds):
        """Readers and waiters poll for `seconds` before sleeping (call before start_link)."""
        rk_engine_set_spin(self.engine, seconds)

    def start_link(self, uint32_t index, int fd, stream=None, registrations=None):
        """Run link index over the TCP socket fd, over a shared-memory channel's
        rings (stream: a ShmChannel) with fd the Unix socket beside them, or over
        a VerbsStream with fd its side channel; all stay the caller's, to close
        (and unmap, release) only after close().  registrations: a verbs link's
        MRCache, on its PD, for zero copy of large chunks."""
        self._check_link(index)
        self.registrations[index] = registrations
        cdef rk_rings rings
        cdef const rk_rings *over = _rings_of(stream if isinstance(stream, ShmChannel) else None, &rings)
        cdef rk_verbs *verbs = _verbs_of(stream)
        self.channels.append(stream)            # its memory outlives our threads
        cdef int rc = rk_engine_start_link(self.engine, index, fd, over, verbs)
        if rc:
            raise OSError(rc, f"starting the engine's threads for link {index}: {__import__('os').strerror(rc)}")

    def wire_bytes(self, uint32_t link):
        """(bytes sent, bytes received) of whole frames on the link since the engine took it."""
        cdef uint64_t counts[2]
        self._check_link(link)
        rk_link_wire_bytes(self.engine, link, counts)
        return counts[0], counts[1]

    def summed_bytes(self, uint32_t link):
        """Push bytes link added straight into its server's shared sums."""
        self._check_link(link)
        return rk_link_summed_bytes(self.engine, link)

    def set_host(self, bint root, uint32_t others, via):
        """One push per host: this worker is its host's root (waiting for `others`
        contributions to each host sum) or one of the others; via[i]: link i's
        server is on another host.  Before any key is declared."""
        if len(via) != self.num_links:
            raise ValueError(f"one via flag per link ({self.num_links}), got {len(via)}")
        cdef bytes flags = bytes(1 if v else 0 for v in via) or b"\0"
        rk_engine_set_host(self.engine, RK_HOST_ROOT if root else RK_HOST_MEMBER, others,
                           <const uint8_t *><const char *>flags)

    def add_key(self, uint64_t wire, uint32_t order, uint8_t dtype_code, offsets, sizes, links,
                host_memory=None, host_offsets=None):
        """Declare a key's chunks; with host_memory (a writable buffer that must
        hold still while the engine lives: it is kept here), chunk i's host sums
        lie at host_offsets[2i] and [2i + 1] in it, each after its control block."""
        cdef uint32_t n = len(offsets)
        cdef uint64_t *o = <uint64_t *>malloc(max(n, 1) * sizeof(uint64_t))
        cdef uint64_t *z = <uint64_t *>malloc(max(n, 1) * sizeof(uint64_t))
        cdef uint32_t *l = <uint32_t *>malloc(max(n, 1) * sizeof(uint32_t))
        cdef char **sums = NULL
        cdef unsigned char[::1] memory
        cdef EngineKey key = EngineKey.__new__(EngineKey)
        if not len(sizes) == len(links) == n:
            raise ValueError("a key's offsets, sizes and links differ in length")
        try:
            if o == NULL or z == NULL or l == NULL:
                raise MemoryError("declaring a key to the native engine")
            for i in range(n):
                o[i], z[i], l[i] = offsets[i], sizes[i], links[i]
                self._check_link(l[i])
                if o[i] + z[i] > key.nbytes:
                    key.nbytes = o[i] + z[i]
            if host_memory is not None:
                memory = host_memory
                if len(host_offsets) != 2 * n:
                    raise ValueError("two host sums per chunk")
                sums = <char **>malloc(max(2 * n, 1) * sizeof(char *))
                if sums == NULL:
                    raise MemoryError("declaring a key to the native engine")
                for i in range(2 * n):
                    if host_offsets[i] < 64 or host_offsets[i] + z[i // 2] > <uint64_t>memory.shape[0]:
                        raise ValueError(f"host sum {i} at {host_offsets[i]} lies outside its memory")
                    sums[i] = <char *>&memory[0] + <size_t>host_offsets[i]
                self.host_memories.append(host_memory)    # its memory outlives our threads
            key.key = rk_engine_add_key(self.engine, wire, order, dtype_code, n, o, z, l, sums)
            if key.key == NULL:
                raise MemoryError("declaring a key to the native engine")
        finally:
            free(o)
            free(z)
            free(l)
            free(sums)
        key.engine = self
        key.zero_copy_links = tuple(sorted({links[i] for i in range(n) if sizes[i] >= RK_ZERO_COPY_BYTES}))
        return key

    def submit(self, EngineKey key not None, source, target, int32_t priority, uint32_t flags):
        """Start a pushpull of key from source into target (None source: a
        broadcast contribution without data); an Operation.  Both buffers are
        held until the engine is done with them."""
        cdef Operation op = Operation.__new__(Operation)
        op.engine = self
        if source is not None:
            PyObject_GetBuffer(source, &op.source_view, PyBUF_ANY_CONTIGUOUS)
            op.has_source = True
        PyObject_GetBuffer(target, &op.target_view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        op.has_target = True
        if op.target_view.len < <Py_ssize_t>key.nbytes or (source is not None and
                                                           op.source_view.len < <Py_ssize_t>key.nbytes):
            raise ValueError(f"a pushpull of this key needs {key.nbytes} bytes in its source and target")
        rk_op_init(&op.op, self.engine, key.key, <const char *>op.source_view.buf if source is not None else NULL,
                   <char *>op.target_view.buf, priority, flags, <void *>op)
        if key.zero_copy_links:
            op._register(self, key, source, target)
        Py_INCREF(op)                 # the engine's reference, dropped by reap()
        with nogil:
            rk_engine_submit(self.engine, &op.op)
        return op

    def reap(self):
        """Drop the engine's references to the ops that finished."""
        cdef rk_op *op = rk_engine_take_finished(self.engine)
        cdef rk_op *following
        while op != NULL:
            following = op.next
            (<Operation>op.owner)._unregister()
            Py_DECREF(<object>op.owner)
            op = following

    def set_codec(self, EngineKey key not None, uint32_t index, Codec codec not None):
        """Compress the pushpulls of the key's chunk `index` (float32; before its first round)."""
        if rk_engine_set_codec(key.key, index, &codec.c):
            raise MemoryError(f"codec buffers of chunk {index}")

    def fail_key(self, EngineKey key not None):
        with nogil:
            rk_engine_fail_key(self.engine, key.key)

    def fail_link(self, uint32_t link, int32_t outcome):
        """Fail what waits on link (ENGINE_ALL_LINKS: on any) with outcome; nothing new starts there."""
        if link != ENGINE_ALL_LINKS:
            self._check_link(link)
        with nogil:
            rk_engine_fail_link(self.engine, link, outcome)

    def allow_states(self, uint32_t link, uint64_t limit):
        self._check_link(link)
        rk_link_allow_states(self.engine, link, limit)

    def send(self, uint32_t link, header, payload=None):
        """Send header and payload on link (serialized with its sender thread);
        (enum rk_error, errno): (0, 0) when sent."""
        cdef Py_buffer hview
        cdef Py_buffer pview
        cdef int rc
        cdef int err = 0
        cdef size_t length = 0
        cdef const char *data = NULL
        self._check_link(link)
        PyObject_GetBuffer(header, &hview, PyBUF_SIMPLE)
        try:
            if hview.len != RK_HEADER_SIZE:
                raise ValueError(f"a header is {RK_HEADER_SIZE} bytes, not {hview.len}")
            if payload is not None:
                PyObject_GetBuffer(payload, &pview, PyBUF_ANY_CONTIGUOUS)
                length, data = pview.len, <const char *>pview.buf
            try:
                with nogil:
                    rc = rk_link_send(self.engine, link, <const char *>hview.buf, data, length, &err)
            finally:
                if payload is not None:
                    PyBuffer_Release(&pview)
        finally:
            PyBuffer_Release(&hview)
        return rc, err

    def next_event(self, double timeout):
        """(link, kind, error, errno, limit, the header's fields in rdmakv.protocol.HEADER's
        order, payload) of the next event, or None after timeout seconds or once closed."""
        cdef rk_event *event
        with nogil:
            event = rk_engine_next_event(self.engine, timeout)
        return _event_tuple(event)

    def close(self):
        """Stop the engine's threads (idempotent); ops still pending stay pending."""
        if self.closed:
            return
        self.closed = True
        with nogil:
            rk_engine_close(self.engine)

    def __dealloc__(self):
        if self.engine != NULL:
            with nogil:
                rk_engine_free(self.engine)
            self.engine = NULL

