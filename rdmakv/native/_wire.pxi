# Declarations both native engines share (wire.h), and how an event reaches Python.

from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t
from libc.stdlib cimport malloc, calloc, free

cdef extern from "wire.h" nogil:
    enum: RK_HEADER_SIZE
    ctypedef struct rk_header:
        uint32_t magic
        unsigned short version
        uint8_t op
        uint8_t dtype
        uint32_t flags
        uint64_t key
        uint32_t chunk
        int32_t priority
        uint64_t round
        uint64_t length
        uint32_t sender
    ctypedef struct rk_rings:
        rdmakv_ring out
        rdmakv_ring inbound "in"
        rdmakv_flag *closing
    ctypedef struct rk_event:
        uint32_t link
        uint32_t kind
        int32_t error
        int32_t sys_errno
        uint64_t limit
        rk_header header
        char *payload
    void rk_event_free(rk_event *event)
    void rk_header_pack(char *out, const rk_header *h)
    void rk_header_unpack(const char *inp, rk_header *h)
    int rk_header_check(const rk_header *h)


# enum rk_event_kind and enum rk_error, for the control plane's messages
EVENT_MESSAGE, EVENT_CLOSED, EVENT_SEND_FAILED, EVENT_REFUSED, EVENT_SUMMED, EVENT_PUSHED = 1, 2, 3, 4, 5, 6
(ERR_EOF, ERR_MIDSTREAM, ERR_TIMEOUT, ERR_IO, ERR_BAD_MAGIC, ERR_BAD_VERSION, ERR_BAD_OP, ERR_BAD_FLAGS,
 ERR_BAD_DTYPE, ERR_TOO_LARGE, ERR_UNEXPECTED_RESULT, ERR_RESULT_LENGTH, ERR_NO_MEMORY, ERR_REFUSED, ERR_CORRUPT,
 ERR_SHARED, ERR_UNREAD, ERR_VIA_HOST, ERR_HOST_STALLED) = range(1, 20)


cdef rk_verbs *_verbs_of(stream) except? NULL:
    """A verbs stream for an engine's link (None where the link is not verbs).
    The engine borrows it: its owner releases it only after the engine closed."""
    if not isinstance(stream, VerbsStream):
        return NULL
    (<VerbsStream>stream)._check("start a link")
    return <rk_verbs *>(<VerbsStream>stream).address()


cdef const rk_rings *_rings_of(ShmChannel channel, rk_rings *rings) except? NULL:
    """A shared-memory channel's rings for an engine's link (None: the link is TCP).
    The engine borrows them: its owner keeps the channel until the engine closed."""
    if channel is None:
        return NULL
    channel._check("start an engine link")
    rings.out = channel.out_ring
    rings.inbound = channel.in_ring
    rings.closing = &channel.stop
    return rings


cdef object _event_tuple(rk_event *event):
    """(link, kind, error, errno, limit, the header's fields in rdmakv.protocol.HEADER's
    order, payload) of an event, which is freed; None for NULL."""
    if event == NULL:
        return None
    try:
        h = event.header
        payload = None if event.payload == NULL else event.payload[:h.length]
        return (event.link, event.kind, event.error, event.sys_errno, event.limit,
                (h.magic, h.version, h.op, h.dtype, h.flags, h.key, h.chunk, h.priority, h.round, h.length,
                 h.sender), payload)
    finally:
        rk_event_free(event)


def header_check(data):
    """rk_header_check of a packed header (for tests: the engine agrees with rdmakv.protocol)."""
    cdef const unsigned char[::1] view = data
    cdef rk_header h
    if view.shape[0] != RK_HEADER_SIZE:
        raise ValueError(f"a header is {RK_HEADER_SIZE} bytes")
    rk_header_unpack(<const char *>&view[0], &h)
    return rk_header_check(&h)
