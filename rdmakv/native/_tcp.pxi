# TCP data path: one frame is a header plus an optional payload, written with a
# single gather list straight from the caller's buffers and read straight into
# the buffer the caller names.  Sockets are non-blocking; poll() bounds every
# wait, so a silent peer becomes a TimeoutError instead of a hang.

cdef enum:
    POLL_SLICE_MS = 100      # how often a long wait re-checks its deadline
    # Transfers this small are first tried once without releasing the GIL: on a
    # non-blocking socket that cannot block, and it saves two GIL hand-offs.
    # Larger ones, and any retry that must wait, run with the GIL released.
    GIL_HELD_BYTES = 65536


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int _wait_fd(int fd, short events, double deadline) noexcept nogil:
    """0 when fd is ready, -1 (errno set) on poll error, -2 when the deadline passed."""
    cdef s.pollfd pfd
    cdef int rc, slice_ms
    cdef double left
    pfd.fd = fd
    pfd.events = events
    while True:
        left = deadline - _now()
        if left <= 0:
            return -2
        slice_ms = <int>(left * 1000) + 1
        if slice_ms > POLL_SLICE_MS:
            slice_ms = POLL_SLICE_MS
        pfd.revents = 0
        rc = s.poll(&pfd, 1, slice_ms)
        if rc > 0:
            return 0        # readable, writable, or an error/hangup that the next call reports
        if rc < 0 and errno != EINTR:
            return -1


cdef ssize_t _send_some(int fd, s.iovec **iov, int *iovcnt) noexcept nogil:
    """One non-blocking sendmsg of what is left, advancing iov past the bytes sent;
    the byte count, or -1 with errno (EAGAIN when the socket buffer is full)."""
    cdef s.msghdr msg
    cdef ssize_t n, sent
    msg.msg_name = NULL
    msg.msg_namelen = 0
    msg.msg_iov = iov[0]
    msg.msg_iovlen = iovcnt[0]
    msg.msg_control = NULL
    msg.msg_controllen = 0
    msg.msg_flags = 0
    n = s.sendmsg(fd, &msg, s.MSG_NOSIGNAL)
    if n < 0:
        return -1
    sent = n
    while iovcnt[0] > 0 and <size_t>n >= iov[0][0].iov_len:
        n -= iov[0][0].iov_len
        iov[0] += 1
        iovcnt[0] -= 1
    if iovcnt[0] > 0:
        iov[0][0].iov_base = <char *>iov[0][0].iov_base + n
        iov[0][0].iov_len -= n
    return sent


cdef int _send_iov(int fd, s.iovec *iov, int iovcnt, double timeout) noexcept nogil:
    """Write every byte of iov; 0, or -1 with errno, or -2 on timeout (no progress)."""
    cdef int rc
    cdef double deadline = _now() + timeout
    while iovcnt > 0:
        if _send_some(fd, &iov, &iovcnt) >= 0:
            deadline = _now() + timeout
        elif errno == EAGAIN:
            rc = _wait_fd(fd, s.POLLOUT, deadline)
            if rc < 0:
                return rc
        elif errno != EINTR:
            return -1
    return 0


cdef int _recv_all(int fd, char *dst, size_t length, double timeout) noexcept nogil:
    """Fill dst; 0, -1 with errno, -2 on timeout (no progress), -3 when the peer
    closed mid-buffer, -4 when it closed before the first byte."""
    cdef ssize_t n
    cdef bint started = False
    cdef int rc
    cdef double deadline = _now() + timeout
    while length > 0:
        n = s.recv(fd, dst, length, 0)
        if n > 0:
            started = True
            dst += n
            length -= n
            deadline = _now() + timeout
        elif n == 0:
            return -3 if started else -4
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:
            rc = _wait_fd(fd, s.POLLIN, deadline)
            if rc < 0:
                return rc
        else:
            return -1
    return 0


cdef int _raise_io(int rc, str what) except -1:
    if rc == -2:
        raise TimeoutError(f"{what}: no progress before the timeout")
    if rc == -3:
        raise ConnectionResetError(f"{what}: the peer closed the connection mid-message")
    if rc == -4:
        raise EOFError(f"{what}: the peer closed the connection")
    raise OSError(errno, f"{what}: {__import__('os').strerror(errno)}")


def send_frame(int fd, header, payload, double timeout, trailer=None):
    """Send header, then payload (None or any contiguous buffer), then trailer
    (None or bytes: a payload's MAC) as one gather write.

    The caller's buffers are read in place, with the GIL released; they must not
    change until this returns."""
    cdef Py_buffer hview
    cdef Py_buffer pview
    cdef const unsigned char[::1] tail
    cdef s.iovec iov[3]
    cdef s.iovec *left = iov
    cdef int iovcnt = 1
    cdef int rc = 0
    cdef size_t total
    cdef int i
    PyObject_GetBuffer(header, &hview, PyBUF_SIMPLE)
    try:
        iov[0].iov_base = hview.buf
        iov[0].iov_len = hview.len
        if payload is not None:
            PyObject_GetBuffer(payload, &pview, PyBUF_ANY_CONTIGUOUS)
            if pview.len > 0:
                iov[iovcnt].iov_base = pview.buf
                iov[iovcnt].iov_len = pview.len
                iovcnt += 1
        try:
            if trailer is not None and len(trailer) > 0:
                tail = trailer
                iov[iovcnt].iov_base = <void *>&tail[0]
                iov[iovcnt].iov_len = tail.shape[0]
                iovcnt += 1
            total = 0
            for i in range(iovcnt):
                total += iov[i].iov_len
            if total <= GIL_HELD_BYTES:
                if _send_some(fd, &left, &iovcnt) < 0 and errno != EAGAIN and errno != EINTR:
                    rc = -1
            if iovcnt > 0 and rc == 0:
                with nogil:
                    rc = _send_iov(fd, left, iovcnt, timeout)
        finally:
            if payload is not None:
                PyBuffer_Release(&pview)
        if rc != 0:
            _raise_io(rc, "send")
    finally:
        PyBuffer_Release(&hview)


def recv_into(int fd, buffer, double timeout):
    """Fill the whole of a writable contiguous buffer from fd; any wait runs with the GIL released."""
    cdef Py_buffer view
    cdef int rc = 0
    cdef ssize_t n = 0
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
    try:
        if view.len <= GIL_HELD_BYTES:
            n = s.recv(fd, view.buf, view.len, s.MSG_DONTWAIT)
            if n == 0 and view.len > 0:
                _raise_io(-4, "receive")
            if n < 0:
                n = 0
        if n < view.len:
            with nogil:
                rc = _recv_all(fd, <char *>view.buf + n, view.len - n, timeout)
            if rc == -4 and n > 0:
                rc = -3       # it closed mid-buffer, after the bytes read above
        if rc != 0:
            _raise_io(rc, "receive")
    finally:
        PyBuffer_Release(&view)


def wait_readable(int fd, double timeout):
    """True once fd has data (or EOF/error to report), False after timeout."""
    cdef int rc
    cdef s.pollfd pfd
    pfd.fd = fd
    pfd.events = s.POLLIN
    pfd.revents = 0
    if s.poll(&pfd, 1, 0) > 0:          # already readable: no need to give up the GIL
        return True
    with nogil:
        rc = _wait_fd(fd, s.POLLIN, _now() + timeout)
    if rc == -1:
        _raise_io(rc, "poll")
    return rc == 0
