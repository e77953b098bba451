# POSIX declarations the TCP data path needs, beyond Cython's own libc/posix.
cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    enum: MSG_NOSIGNAL
    enum: MSG_DONTWAIT

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN
    enum: POLLOUT
    enum: POLLERR
    enum: POLLHUP

cdef extern from "_reduce.h" nogil:
    void rdmakv_add_f32(void *dst, const void *src, size_t count)
    void rdmakv_add_f64(void *dst, const void *src, size_t count)
    void rdmakv_add_f16(void *dst, const void *src, size_t count)
    void rdmakv_add_i8(void *dst, const void *src, size_t count)
    void rdmakv_add_u8(void *dst, const void *src, size_t count)
    void rdmakv_add_i32(void *dst, const void *src, size_t count)
    void rdmakv_add_i64(void *dst, const void *src, size_t count)
