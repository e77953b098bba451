# The server's reduction: dst += src in place, GIL released.  The codes are
# rdmakv.core.protocol.DTYPE_CODES; tests check each against numpy.

ctypedef void (*add_fn)(void *, const void *, size_t) noexcept nogil

cdef add_fn _adder(int code, Py_ssize_t *itemsize) except NULL:
    if code == 1:
        itemsize[0] = 2
        return s.rdmakv_add_f16
    if code == 2:
        itemsize[0] = 4
        return s.rdmakv_add_f32
    if code == 3:
        itemsize[0] = 8
        return s.rdmakv_add_f64
    if code == 4:
        itemsize[0] = 1
        return s.rdmakv_add_i8
    if code == 5:
        itemsize[0] = 1
        return s.rdmakv_add_u8
    if code == 6:
        itemsize[0] = 4
        return s.rdmakv_add_i32
    if code == 7:
        itemsize[0] = 8
        return s.rdmakv_add_i64
    raise ValueError(f"no reduction for dtype code {code}")


def add_into(dst, src, int dtype_code):
    """dst += src elementwise; both contiguous buffers of the same byte length."""
    cdef Py_buffer dview
    cdef Py_buffer sview
    cdef Py_ssize_t itemsize = 0
    cdef add_fn add = _adder(dtype_code, &itemsize)
    PyObject_GetBuffer(dst, &dview, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
    try:
        PyObject_GetBuffer(src, &sview, PyBUF_ANY_CONTIGUOUS)
        try:
            if dview.len != sview.len or dview.len % itemsize:
                raise ValueError(
                    f"add_into: {dview.len} and {sview.len} bytes are not equal whole arrays of {itemsize}-byte items")
            if dview.len <= GIL_HELD_BYTES:     # shorter than a GIL hand-off
                add(dview.buf, sview.buf, <size_t>(dview.len // itemsize))
            else:
                with nogil:
                    add(dview.buf, sview.buf, <size_t>(dview.len // itemsize))
        finally:
            PyBuffer_Release(&sview)
    finally:
        PyBuffer_Release(&dview)
