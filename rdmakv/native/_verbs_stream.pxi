# A link's byte stream over an RC queue pair (verbs_stream.h): the mechanism.
# rdmakv/transport/verbs/stream.py builds the verbs objects and decides sizes;
# a native engine borrows the stream for a link, and the connection reads and
# writes it itself before the engine runs the link (the authentication
# handshake) and for control messages.

cdef extern from "verbs_stream.h" nogil:
    ctypedef int (*rk_get_cq_event_fn)(v.ibv_comp_channel *, v.ibv_cq **, void **)
    ctypedef void (*rk_ack_cq_events_fn)(v.ibv_cq *, unsigned int)
    ctypedef v.ibv_mr *(*rk_reg_mr_fn)(v.ibv_pd *, void *, size_t, int)
    ctypedef int (*rk_dereg_mr_fn)(v.ibv_mr *)
    ctypedef struct rk_verbs:
        v.ibv_qp *qp
        v.ibv_cq *cq
        v.ibv_comp_channel *channel
        rk_get_cq_event_fn get_cq_event
        rk_ack_cq_events_fn ack_cq_events
        rk_reg_mr_fn reg_mr
        rk_dereg_mr_fn dereg_mr
        int side_fd
        int wake_fd
        uint32_t send_depth
        uint32_t recv_depth
        uint32_t max_inline
        char *in_data
        uint32_t in_size
        char *out_data
        uint32_t out_lkey
        uint32_t out_size
        uint64_t peer_addr
        uint32_t peer_rkey
        uint32_t unacked_events
        uint64_t copied_bytes
        uint64_t placed_bytes
    int rk_verbs_open(rk_verbs *vs)
    void rk_verbs_shut(rk_verbs *vs)
    int rk_verbs_drain(rk_verbs *vs, double seconds)
    void rk_verbs_free(rk_verbs *vs)
    size_t rk_verbs_readable(rk_verbs *vs)
    int rk_verbs_wait_readable(rk_verbs *vs, rdmakv_flag *stop, double deadline, double spin, int *err)
    int rk_verbs_recv(rk_verbs *vs, rdmakv_flag *stop, char *dst, size_t length, int at_start, double timeout,
                      int *err)
    int rk_verbs_send(rk_verbs *vs, rdmakv_flag *stop, s.iovec *iov, const uint32_t *lkeys, int count,
                      double timeout, int *err)

cdef extern from *:
    """
    static rk_get_cq_event_fn rdmakv_get_cq_event_fn(void) { return rdmakv_p_ibv_get_cq_event; }
    static rk_ack_cq_events_fn rdmakv_ack_cq_events_fn(void) { return rdmakv_p_ibv_ack_cq_events; }
    static rk_reg_mr_fn rdmakv_reg_mr_fn(void) { return rdmakv_p_ibv_reg_mr; }
    static rk_dereg_mr_fn rdmakv_dereg_mr_fn(void) { return rdmakv_p_ibv_dereg_mr; }
    """
    rk_get_cq_event_fn rdmakv_get_cq_event_fn() noexcept nogil
    rk_ack_cq_events_fn rdmakv_ack_cq_events_fn() noexcept nogil
    rk_reg_mr_fn rdmakv_reg_mr_fn() noexcept nogil
    rk_dereg_mr_fn rdmakv_dereg_mr_fn() noexcept nogil


cdef int _raise_verbs_stream(int rc, int err, str what) except -1:
    """A verbs stream's code as the exception the connection words (as _raise_shm's)."""
    if rc == ERR_TIMEOUT:
        raise TimeoutError(f"{what}: timed out")
    if rc == ERR_EOF:
        raise EOFError(f"{what}: the peer is gone")
    if rc == ERR_MIDSTREAM:
        raise ConnectionResetError(f"{what}: the peer left mid-message")
    if rc == -1:        # RK_STOPPED
        raise ConnectionAbortedError(f"{what}: closed locally")
    if rc == ERR_CORRUPT:
        raise ValueError(f"{what}: the peer's ring counters cannot be (a bug or a hostile peer)")
    raise OSError(err, f"{what}: {__import__('os').strerror(err) if err else 'failed'}")


@cython.no_gc_clear
cdef class VerbsStream:
    """The byte stream of one verbs connection (verbs_stream.h).  Borrows the
    connection's verbs objects, which it keeps referenced; release() before
    they are destroyed, and only once no engine thread uses it."""
    cdef rk_verbs *vs
    cdef rdmakv_flag stop
    cdef object _keep              # the verbs objects and rings the stream points into
    cdef int pid

    def __cinit__(self, QP qp not None, CQ cq not None, CompChannel channel not None, MR inbound not None,
                  MR outbound not None, int side_fd, uint64_t peer_addr, uint32_t peer_rkey, uint32_t send_depth,
                  uint32_t recv_depth):
        cdef int rc
        qp._alive()
        cq._alive()
        self.vs = <rk_verbs *>calloc(1, sizeof(rk_verbs))
        if self.vs == NULL:
            raise MemoryError("a verbs stream")
        self.vs.qp = qp._handle
        self.vs.cq = cq._handle
        self.vs.channel = channel._handle
        self.vs.get_cq_event = rdmakv_get_cq_event_fn()
        self.vs.ack_cq_events = rdmakv_ack_cq_events_fn()
        self.vs.reg_mr = rdmakv_reg_mr_fn()
        self.vs.dereg_mr = rdmakv_dereg_mr_fn()
        self.vs.side_fd = side_fd
        self.vs.wake_fd = -1
        self.vs.send_depth = send_depth
        self.vs.recv_depth = recv_depth
        self.vs.max_inline = qp._max_inline
        self.vs.in_data = <char *>inbound._handle.addr
        self.vs.in_size = <uint32_t>inbound._handle.length
        self.vs.out_data = <char *>outbound._handle.addr
        self.vs.out_lkey = outbound._handle.lkey
        self.vs.out_size = <uint32_t>outbound._handle.length
        self.vs.peer_addr = peer_addr
        self.vs.peer_rkey = peer_rkey
        self._keep = (qp, cq, channel, inbound, outbound)
        self.stop = 0
        self.pid = __import__('os').getpid()
        rc = rk_verbs_open(self.vs)
        if rc:
            rk_verbs_free(self.vs)
            free(self.vs)
            self.vs = NULL
            raise OSError(rc, f"opening a verbs stream: {__import__('os').strerror(rc)}")

    cdef int _check(self, str what) except -1:
        if self.vs == NULL:
            raise ConnectionAbortedError(f"{what}: closed locally")
        if self.pid != __import__('os').getpid():
            raise ConnectionAbortedError(f"{what}: the stream belongs to the parent process")
        return 0

    cdef size_t address(self):
        return <size_t>self.vs

    def send_frame(self, header, payload, double timeout):
        """Send header then payload (None or a contiguous buffer); returns once
        both are copied out, so the caller may reuse them."""
        cdef Py_buffer hview
        cdef Py_buffer pview
        cdef s.iovec iov[2]
        cdef int count = 1, rc, err = 0
        self._check("send")
        PyObject_GetBuffer(header, &hview, PyBUF_SIMPLE)
        try:
            iov[0].iov_base = hview.buf
            iov[0].iov_len = hview.len
            if payload is not None:
                PyObject_GetBuffer(payload, &pview, PyBUF_ANY_CONTIGUOUS)
                iov[1].iov_base = pview.buf
                iov[1].iov_len = pview.len
                count = 2
            try:
                with nogil:
                    rc = rk_verbs_send(self.vs, &self.stop, iov, NULL, count, timeout, &err)
            finally:
                if payload is not None:
                    PyBuffer_Release(&pview)
            if rc:
                _raise_verbs_stream(rc, err, "send")
        finally:
            PyBuffer_Release(&hview)

    def recv_into(self, buffer, double timeout):
        """Fill the whole of a writable contiguous buffer from the stream."""
        cdef Py_buffer view
        cdef int rc = 0, err = 0
        self._check("receive")
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        try:
            with nogil:
                rc = rk_verbs_recv(self.vs, &self.stop, <char *>view.buf, view.len, 0, timeout, &err)
            if rc:
                _raise_verbs_stream(rc, err, "receive")
        finally:
            PyBuffer_Release(&view)

    def available(self):
        """Bytes that recv_into can take now without waiting."""
        self._check("receive")
        return rk_verbs_readable(self.vs)

    def wait_readable(self, double timeout):
        """True once bytes arrived, False after timeout; EOFError once the peer
        left and everything it sent was read."""
        cdef int rc, err = 0
        cdef double deadline
        self._check("receive")
        if rk_verbs_readable(self.vs):
            return True
        deadline = _now() + (timeout if timeout > 0 else 0.0001)
        with nogil:
            rc = rk_verbs_wait_readable(self.vs, &self.stop, deadline, 0, &err)
        if rc == ERR_TIMEOUT:
            return False
        if rc:
            _raise_verbs_stream(rc, err, "receive")
        return True

    def counters(self):
        """(bytes copied into staging or out of our ring, bytes RDMA-written from where they were)."""
        if self.vs == NULL:
            return 0, 0
        return self.vs.copied_bytes, self.vs.placed_bytes

    def drain(self, double seconds):
        """Wait up to `seconds` for every posted write to complete; whether they did."""
        cdef int done
        if self.vs == NULL:
            return True
        with nogil:
            done = rk_verbs_drain(self.vs, seconds)
        return bool(done)

    def shut(self):
        """End every wait on the stream, ours and an engine's (not in a forked child)."""
        if self.vs != NULL and self.pid == __import__('os').getpid():
            self.stop = 1
            rk_verbs_shut(self.vs)

    def release(self):
        """Free the stream, before the verbs objects go; only once no thread uses it."""
        if self.vs != NULL:
            if self.pid == __import__('os').getpid():
                rk_verbs_free(self.vs)
            free(self.vs)
            self.vs = NULL

    def __dealloc__(self):
        # A backstop.  The completion events must be acknowledged while the CQ lives
        # (else destroying it waits forever), and only then: _keep holds it (no_gc_clear).
        if self.vs != NULL:
            if (self.pid != __import__('os').getpid() or self._keep is None
                    or (<CQ>self._keep[1])._handle != self.vs.cq):
                self.vs.unacked_events = 0
            rk_verbs_free(self.vs)
            free(self.vs)
            self.vs = NULL
