# Shared-memory data path: one mapped segment per connection holding two byte
# rings (rdmakv/native/_shm.h), one per direction.  A frame is copied into the ring by
# the sender and out of it by the receiver straight into the destination, or,
# for a payload that already lies in memory the sender shared, read from there
# in place (copy_region).  A push can also be added straight into a sum that
# several processes build in shared memory (sum_into_shared).  The loops run
# with the GIL released, and every wait is bounded.  Policy (set-up, peer
# names, errors) lives in rdmakv/transport/shm/.

from libc.string cimport memcpy
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED, MAP_POPULATE


cdef extern from "_shm.h" nogil:
    ctypedef unsigned int rdmakv_flag
    ctypedef struct rdmakv_ring_ctl:
        pass
    ctypedef struct rdmakv_ring:
        rdmakv_ring_ctl *ctl
        char *data
        unsigned int size
    enum:
        RDMAKV_SHM_CONTROL
        RDMAKV_SHM_TIMEOUT
        RDMAKV_SHM_GONE_MID
        RDMAKV_SHM_GONE
        RDMAKV_SHM_CORRUPT
        RDMAKV_SHM_STOPPED
    int rdmakv_ring_try_write2(rdmakv_ring *r, const char *a, size_t an, const char *b, size_t bn)
    int rdmakv_ring_write(rdmakv_ring *r, const char *src, size_t n, double timeout, rdmakv_flag *stop, int fd)
    int rdmakv_ring_wait(rdmakv_ring *r, double timeout, rdmakv_flag *stop, int fd)
    int rdmakv_ring_read(rdmakv_ring *r, char *dst, size_t n, double timeout, rdmakv_flag *stop, int fd)
    int rdmakv_ring_try_read(rdmakv_ring *r, char *dst, size_t n)
    ctypedef void (*rdmakv_add_fn)(void *dst, const void *src, size_t count) noexcept nogil
    int rdmakv_ring_avail(rdmakv_ring *r)
    void rdmakv_ring_init(rdmakv_ring *r)
    void rdmakv_shm_shutdown(rdmakv_ring *out, rdmakv_ring *inb, rdmakv_flag *stop)
    enum:
        RDMAKV_SUM_CONTROL
    int rdmakv_sum_contribute(char *dst, const char *src, size_t n, rdmakv_add_fn add, size_t itemsize,
                              unsigned long long round, double timeout, rdmakv_flag *stop)


SHM_CONTROL_BYTES = RDMAKV_SHM_CONTROL
SUM_CONTROL_BYTES = RDMAKV_SUM_CONTROL


def shm_segment_bytes(size_t ring_bytes):
    """Bytes of a segment holding two rings of ring_bytes each."""
    return 2 * (RDMAKV_SHM_CONTROL + ring_bytes)


cdef int _raise_shm(int rc, str what) except -1:
    if rc == RDMAKV_SHM_TIMEOUT:
        raise TimeoutError(f"{what}: no progress before the timeout")
    if rc == RDMAKV_SHM_GONE_MID:
        raise ConnectionResetError(f"{what}: the peer left mid-message")
    if rc == RDMAKV_SHM_GONE:
        raise EOFError(f"{what}: the peer closed the connection")
    if rc == RDMAKV_SHM_CORRUPT:
        raise ValueError(f"{what}: the shared ring's counters are inconsistent")
    if rc == RDMAKV_SHM_STOPPED:
        raise ConnectionAbortedError(f"{what}: closed locally")
    raise OSError(f"{what}: shared-memory ring error {rc}")


cdef class ShmChannel:
    """Both rings of one connection, mapped from a memory fd.

    `liveness_fd` is a stream socket to the peer that carries nothing after
    the set-up: any event on it means the peer is gone.  The owner must stop
    every thread using the channel (shutdown(), then wait for them) before
    unmap(); close ordering is the policy layer's job."""
    cdef char *base
    cdef size_t length
    cdef rdmakv_ring out_ring
    cdef rdmakv_ring in_ring
    cdef rdmakv_flag stop
    cdef int fd
    cdef int pid

    def __cinit__(self, int memfd, int liveness_fd, size_t ring_bytes, bint first):
        cdef void *address
        cdef char *a
        cdef char *b
        self.base = NULL
        self.length = shm_segment_bytes(ring_bytes)
        # Populated at once: the rings' pages are all used soon anyway, and a
        # first pass through them would otherwise fault a page at a time
        # (and look like growth to anyone watching RSS).
        with nogil:
            address = mmap(NULL, self.length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, memfd, 0)
        if address == MAP_FAILED:
            raise OSError(errno, f"mmap of the shared segment: {__import__('os').strerror(errno)}")
        self.base = <char *>address
        self.fd = liveness_fd
        self.stop = 0
        self.pid = __import__('os').getpid()
        a = self.base                                   # ring written by the first side
        b = self.base + RDMAKV_SHM_CONTROL + ring_bytes  # ring written by the second side
        self.out_ring.ctl = <rdmakv_ring_ctl *>(a if first else b)
        self.out_ring.data = (a if first else b) + RDMAKV_SHM_CONTROL
        self.out_ring.size = <unsigned int>ring_bytes
        self.in_ring.ctl = <rdmakv_ring_ctl *>(b if first else a)
        self.in_ring.data = (b if first else a) + RDMAKV_SHM_CONTROL
        self.in_ring.size = <unsigned int>ring_bytes
        if first:                                       # the creator, before the peer sees it
            rdmakv_ring_init(&self.out_ring)
            rdmakv_ring_init(&self.in_ring)

    cdef int _check(self, str what) except -1:
        if self.base == NULL:
            raise ConnectionAbortedError(f"{what}: closed locally")
        return 0

    def send_frame(self, header, payload, double timeout):
        """Copy header then payload (None or a contiguous buffer) into the ring;
        returns once both are copied, so the caller may reuse them."""
        cdef Py_buffer hview
        cdef Py_buffer pview
        cdef const char *p = NULL
        cdef size_t plen = 0
        cdef int rc = 0
        self._check("send")
        PyObject_GetBuffer(header, &hview, PyBUF_SIMPLE)
        try:
            if payload is not None:
                PyObject_GetBuffer(payload, &pview, PyBUF_ANY_CONTIGUOUS)
                p = <const char *>pview.buf
                plen = pview.len
            try:
                if <size_t>hview.len + plen <= GIL_HELD_BYTES:
                    rc = rdmakv_ring_try_write2(&self.out_ring, <const char *>hview.buf, hview.len, p, plen)
                if rc == 0:
                    with nogil:
                        rc = rdmakv_ring_write(&self.out_ring, <const char *>hview.buf, hview.len,
                                               timeout, &self.stop, self.fd)
                        if rc == 0 and plen > 0:
                            rc = rdmakv_ring_write(&self.out_ring, p, plen, timeout, &self.stop, self.fd)
                elif rc == 1:
                    rc = 0
            finally:
                if payload is not None:
                    PyBuffer_Release(&pview)
            if rc != 0:
                _raise_shm(rc, "send")
        finally:
            PyBuffer_Release(&hview)

    def recv_into(self, buffer, double timeout):
        """Fill the whole of a writable contiguous buffer from the ring."""
        cdef Py_buffer view
        cdef int rc = 0
        self._check("receive")
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        try:
            if view.len <= GIL_HELD_BYTES:
                rc = rdmakv_ring_try_read(&self.in_ring, <char *>view.buf, view.len)
            if rc == 0 and view.len > 0:
                with nogil:
                    rc = rdmakv_ring_read(&self.in_ring, <char *>view.buf, view.len, timeout, &self.stop, self.fd)
            elif rc == 1:
                rc = 0
            if rc != 0:
                _raise_shm(rc, "receive")
        finally:
            PyBuffer_Release(&view)

    def available(self):
        """Bytes that recv_into can take now without waiting."""
        cdef int rc
        self._check("receive")
        rc = rdmakv_ring_avail(&self.in_ring)
        if rc < 0:
            _raise_shm(rc, "receive")
        return rc

    def wait_readable(self, double timeout):
        """True once the ring holds data, False after timeout; EOFError once the
        peer left and everything it sent was read."""
        cdef int rc
        self._check("receive")
        rc = rdmakv_ring_avail(&self.in_ring)
        if rc > 0:                      # already there: no need to give up the GIL
            return True
        if rc < 0:
            _raise_shm(rc, "receive")
        with nogil:
            rc = rdmakv_ring_wait(&self.in_ring, timeout, &self.stop, self.fd)
        if rc < 0:
            _raise_shm(rc, "receive")
        return rc == 1

    def shutdown(self):
        """Tell the peer we are done and wake our own blocked senders and receivers.
        Does nothing in a forked child, which must not end its parent's connection."""
        if self.base != NULL and self.pid == __import__('os').getpid():
            rdmakv_shm_shutdown(&self.out_ring, &self.in_ring, &self.stop)

    def unmap(self):
        """Release the mapping; only once no thread uses the channel any more."""
        if self.base != NULL:
            munmap(self.base, self.length)
            self.base = NULL

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.length)
            self.base = NULL


def copy_region(source, size_t offset, destination):
    """Fill the whole of the writable buffer `destination` from `source`
    starting at byte `offset` (a peer's shared memory, read in place),
    with the GIL released; a region outside `source` is a ValueError."""
    cdef Py_buffer sview
    cdef Py_buffer dview
    PyObject_GetBuffer(source, &sview, PyBUF_ANY_CONTIGUOUS)
    try:
        PyObject_GetBuffer(destination, &dview, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        try:
            if offset > <size_t>sview.len or <size_t>dview.len > <size_t>sview.len - offset:
                raise ValueError(f"a region of {dview.len} bytes at offset {offset} lies outside "
                                 f"the {sview.len}-byte shared segment")
            if dview.len <= GIL_HELD_BYTES:
                memcpy(dview.buf, <const char *>sview.buf + offset, dview.len)
            else:
                with nogil:
                    memcpy(dview.buf, <const char *>sview.buf + offset, dview.len)
        finally:
            PyBuffer_Release(&dview)
    finally:
        PyBuffer_Release(&sview)


def sum_into_shared(region, size_t offset, source, int dtype_code, unsigned long long round, double timeout,
                    ShmChannel channel=None):
    """Contribute `source` to round `round`'s sum in the shared buffer at byte
    `offset` of the writable `region`, whose control block fills the
    SUM_CONTROL_BYTES before it (see _shm.h): copied in as the round's first
    contribution, else added as items of dtype_code; GIL released.  Waiting for
    another contributor ends after `timeout` (TimeoutError) or when `channel`
    is closed locally."""
    cdef Py_buffer rview
    cdef Py_buffer sview
    cdef Py_ssize_t itemsize = 0
    cdef add_fn add = _adder(dtype_code, &itemsize)
    cdef rdmakv_flag never_stopped = 0
    cdef rdmakv_flag *stop = &never_stopped
    cdef int rc
    if channel is not None:
        channel._check("sum")
        stop = &channel.stop
    PyObject_GetBuffer(region, &rview, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
    try:
        PyObject_GetBuffer(source, &sview, PyBUF_ANY_CONTIGUOUS)
        try:
            if (offset < RDMAKV_SUM_CONTROL or offset % RDMAKV_SUM_CONTROL or offset > <size_t>rview.len
                    or <size_t>sview.len > <size_t>rview.len - offset):
                raise ValueError(f"a shared sum of {sview.len} bytes at offset {offset} does not fit "
                                 f"the {rview.len}-byte segment with its control block")
            if sview.len % itemsize:
                raise ValueError(f"a shared sum of {sview.len} bytes is not whole {itemsize}-byte items")
            with nogil:
                rc = rdmakv_sum_contribute(<char *>rview.buf + offset, <const char *>sview.buf, sview.len,
                                           <rdmakv_add_fn>add, itemsize, round, timeout, stop)
            if rc != 0:
                _raise_shm(rc, "sum")
        finally:
            PyBuffer_Release(&sview)
    finally:
        PyBuffer_Release(&rview)
