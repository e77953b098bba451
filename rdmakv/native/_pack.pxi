# Tensor fusion: many small contiguous buffers packed one after another into
# one buffer and back, in one call with the GIL released, instead of a numpy
# operation per tensor.

from libc.stdlib cimport malloc, free
from libc.string cimport memcpy


cdef int _copy_many(list buffers, packed, bint into_packed) except -1:
    cdef Py_ssize_t count = len(buffers), held = 0, total = 0, offset = 0, i
    cdef Py_buffer packed_view
    cdef Py_buffer *views = <Py_buffer *>malloc(max(count, 1) * sizeof(Py_buffer))
    if views == NULL:
        raise MemoryError()
    try:
        for i in range(count):
            PyObject_GetBuffer(buffers[i], &views[i],
                               (PyBUF_SIMPLE if into_packed else PyBUF_WRITABLE) | PyBUF_ANY_CONTIGUOUS)
            held += 1
            total += views[i].len
        PyObject_GetBuffer(packed, &packed_view,
                           (PyBUF_WRITABLE if into_packed else PyBUF_SIMPLE) | PyBUF_ANY_CONTIGUOUS)
        try:
            if total != packed_view.len:
                raise ValueError(f"{count} buffers hold {total} bytes, the packed buffer {packed_view.len}")
            with nogil:
                for i in range(count):
                    if into_packed:
                        memcpy(<char *>packed_view.buf + offset, views[i].buf, views[i].len)
                    else:
                        memcpy(views[i].buf, <char *>packed_view.buf + offset, views[i].len)
                    offset += views[i].len
        finally:
            PyBuffer_Release(&packed_view)
    finally:
        for i in range(held):
            PyBuffer_Release(&views[i])
        free(views)
    return 0


def pack(list buffers, packed):
    """Copy contiguous buffers one after another into `packed` (exactly their total length)."""
    _copy_many(buffers, packed, True)


def unpack(packed, list buffers):
    """Copy `packed` out into contiguous writable buffers, one after another."""
    _copy_many(buffers, packed, False)
