# TCP data path: one frame is a header plus an optional payload, written with a
# single gather list straight from the caller's buffers and read straight into
# the buffer the caller names.  Sockets are non-blocking; poll() bounds every
# wait, so a silent peer becomes a TimeoutError instead of a hang.

cdef enum:
    POLL_SLICE_MS = 100      # how often a long wait re-checks its deadline


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


cdef int _send_iov(int fd, s.iovec *iov, int iovcnt, double timeout) noexcept nogil:
    """Write every byte of iov; 0, or -1 with errno, or -2 on timeout (no progress)."""
    cdef s.msghdr msg
    cdef ssize_t n
    cdef int rc
    cdef double deadline = _now() + timeout
    while iovcnt > 0:
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_iov = iov
        msg.msg_iovlen = iovcnt
        msg.msg_control = NULL
        msg.msg_controllen = 0
        msg.msg_flags = 0
        n = s.sendmsg(fd, &msg, s.MSG_NOSIGNAL)
        if n < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                rc = _wait_fd(fd, s.POLLOUT, deadline)
                if rc < 0:
                    return rc
                continue
            return -1
        deadline = _now() + timeout
        while iovcnt > 0 and <size_t>n >= iov[0].iov_len:
            n -= iov[0].iov_len
            iov += 1
            iovcnt -= 1
        if iovcnt > 0:
            iov[0].iov_base = <char *>iov[0].iov_base + n
            iov[0].iov_len -= n
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


def send_frame(int fd, header, payload, double timeout):
    """Send header then payload (None or any contiguous buffer) as one gather write.

    The caller's buffers are read in place, with the GIL released; they must not
    change until this returns."""
    cdef Py_buffer hview
    cdef Py_buffer pview
    cdef s.iovec iov[2]
    cdef int iovcnt = 1
    cdef int rc
    PyObject_GetBuffer(header, &hview, PyBUF_SIMPLE)
    try:
        iov[0].iov_base = hview.buf
        iov[0].iov_len = hview.len
        if payload is not None:
            PyObject_GetBuffer(payload, &pview, PyBUF_ANY_CONTIGUOUS)
            iov[1].iov_base = pview.buf
            iov[1].iov_len = pview.len
            if pview.len > 0:
                iovcnt = 2
        try:
            with nogil:
                rc = _send_iov(fd, iov, iovcnt, timeout)
        finally:
            if payload is not None:
                PyBuffer_Release(&pview)
        if rc != 0:
            _raise_io(rc, "send")
    finally:
        PyBuffer_Release(&hview)


def recv_into(int fd, buffer, double timeout):
    """Fill the whole of a writable contiguous buffer from fd, GIL released."""
    cdef Py_buffer view
    cdef int rc
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
    try:
        with nogil:
            rc = _recv_all(fd, <char *>view.buf, view.len, timeout)
        if rc != 0:
            _raise_io(rc, "receive")
    finally:
        PyBuffer_Release(&view)


def wait_readable(int fd, double timeout):
    """True once fd has data (or EOF/error to report), False after timeout."""
    cdef int rc
    with nogil:
        rc = _wait_fd(fd, s.POLLIN, _now() + timeout)
    if rc == -1:
        _raise_io(rc, "poll")
    return rc == 0
