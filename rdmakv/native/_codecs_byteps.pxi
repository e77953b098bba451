# BytePS's compressors (codecs_byteps.h) on float32 buffers, for tests and for
# Python code that encodes outside the engines.  Each loop runs with the GIL
# released.  Parameters out of range and bytes that are not an encoding raise
# ValueError.

from cpython.buffer cimport PyBUF_FORMAT
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

cdef extern from "codecs_byteps.h" nogil:
    enum: RK_DITHER_LINEAR
    enum: RK_DITHER_NATURAL
    enum: RK_DITHER_MAX
    enum: RK_DITHER_L2
    size_t rk_onebit_max_bytes(size_t count)
    size_t rk_onebit_encode(const float *src, size_t count, int scaled, void *dst)
    int rk_onebit_decode_add(const void *src, size_t nbytes, float *dst, size_t count)
    size_t rk_topk_max_bytes(size_t count, uint32_t k)
    size_t rk_topk_encode(const float *src, size_t count, uint32_t k, void *dst)
    int rk_topk_decode_add(const void *src, size_t nbytes, float *dst, size_t count, uint32_t k)
    size_t rk_randomk_max_bytes(size_t count, uint32_t k)
    size_t rk_randomk_encode(const float *src, size_t count, uint32_t k, uint64_t *rng, void *dst)
    int rk_randomk_decode_add(const void *src, size_t nbytes, float *dst, size_t count, uint32_t k)
    size_t rk_dithering_max_bytes(size_t count, uint32_t levels, int partition)
    size_t rk_dithering_encode(const float *src, size_t count, uint32_t levels, int partition, int normalize,
                               uint64_t *rng, void *dst)
    int rk_dithering_decode_add(const void *src, size_t nbytes, float *dst, size_t count, uint32_t levels,
                                int partition)

DITHER_PARTITIONS = {"linear": RK_DITHER_LINEAR, "natural": RK_DITHER_NATURAL}
DITHER_NORMS = {"max": RK_DITHER_MAX, "l2": RK_DITHER_L2}

cdef enum _codec_id:
    _ONEBIT, _TOPK, _RANDOMK, _DITHERING

cdef struct _codec_args:
    int id
    int scaled
    uint32_t k                  # kept values (topk, randomk); levels (dithering)
    int partition
    int normalize
    uint64_t rng


cdef int _get_floats(obj, Py_buffer *view, bint writable) except -1:
    """A contiguous float32 view of obj (released by the caller)."""
    PyObject_GetBuffer(obj, view, (PyBUF_WRITABLE if writable else PyBUF_SIMPLE) | PyBUF_FORMAT | PyBUF_ANY_CONTIGUOUS)
    fmt = view.format.decode("ascii") if view.format != NULL else "B"
    if fmt.lstrip("@=") != "f":
        PyBuffer_Release(view)
        raise TypeError(f"codecs take native float32 buffers, not format {fmt!r}")
    return 0


cdef size_t _max_bytes(const _codec_args *a, size_t count) noexcept nogil:
    if a.id == _ONEBIT:
        return rk_onebit_max_bytes(count)
    if a.id == _TOPK:
        return rk_topk_max_bytes(count, a.k)
    if a.id == _RANDOMK:
        return rk_randomk_max_bytes(count, a.k)
    return rk_dithering_max_bytes(count, a.k, a.partition)


cdef bytes _encode(str name, _codec_args *a, src):
    cdef Py_buffer view
    cdef size_t count, size, written = 0
    cdef char *out_p
    _get_floats(src, &view, False)
    try:
        count = <size_t>view.len // 4
        size = _max_bytes(a, count)
        if size == 0 and (count or a.id == _DITHERING):
            raise ValueError(f"{name}: parameters out of range for {count} values")
        out = PyBytes_FromStringAndSize(NULL, size)
        out_p = PyBytes_AS_STRING(out)
        with nogil:
            if a.id == _ONEBIT:
                written = rk_onebit_encode(<const float *>view.buf, count, a.scaled, out_p)
            elif a.id == _TOPK:
                written = rk_topk_encode(<const float *>view.buf, count, a.k, out_p)
            elif a.id == _RANDOMK:
                written = rk_randomk_encode(<const float *>view.buf, count, a.k, &a.rng, out_p)
            else:
                written = rk_dithering_encode(<const float *>view.buf, count, a.k, a.partition, a.normalize,
                                              &a.rng, out_p)
    finally:
        PyBuffer_Release(&view)
    return out if written == size else out[:written]


cdef _decode_add(str name, const _codec_args *a, data, dst):
    cdef const unsigned char[::1] raw = data
    cdef const unsigned char *raw_p = &raw[0] if raw.shape[0] else <const unsigned char *>""
    cdef size_t nbytes = raw.shape[0], count
    cdef int rc
    cdef Py_buffer view
    _get_floats(dst, &view, True)
    try:
        count = <size_t>view.len // 4
        with nogil:
            if a.id == _ONEBIT:
                rc = rk_onebit_decode_add(raw_p, nbytes, <float *>view.buf, count)
            elif a.id == _TOPK:
                rc = rk_topk_decode_add(raw_p, nbytes, <float *>view.buf, count, a.k)
            elif a.id == _RANDOMK:
                rc = rk_randomk_decode_add(raw_p, nbytes, <float *>view.buf, count, a.k)
            else:
                rc = rk_dithering_decode_add(raw_p, nbytes, <float *>view.buf, count, a.k, a.partition)
    finally:
        PyBuffer_Release(&view)
    if rc != 0:
        raise ValueError(f"{name}: {nbytes} bytes are not an encoding of {count} values")


cdef _codec_args _dithering_args(uint32_t levels, str partition, str normalize, uint64_t rng) except *:
    if partition not in DITHER_PARTITIONS:
        raise ValueError(f"dithering: partition {partition!r} is not one of {sorted(DITHER_PARTITIONS)}")
    if normalize not in DITHER_NORMS:
        raise ValueError(f"dithering: normalization {normalize!r} is not one of {sorted(DITHER_NORMS)}")
    return _codec_args(id=_DITHERING, scaled=0, k=levels, partition=DITHER_PARTITIONS[partition],
                       normalize=DITHER_NORMS[normalize], rng=rng)


def onebit_max_bytes(size_t count):
    return rk_onebit_max_bytes(count)

def onebit_encode(src, bint scaled=True):
    """The signs of src, and the scale mean |src| (scaled) or 1."""
    cdef _codec_args a = _codec_args(id=_ONEBIT, scaled=scaled, k=0, partition=0, normalize=0, rng=0)
    return _encode("onebit", &a, src)

def onebit_decode_add(data, dst):
    """dst += the values data decodes to."""
    cdef _codec_args a = _codec_args(id=_ONEBIT, scaled=0, k=0, partition=0, normalize=0, rng=0)
    _decode_add("onebit", &a, data, dst)


def topk_max_bytes(size_t count, uint32_t k):
    return rk_topk_max_bytes(count, k)

def topk_encode(src, uint32_t k):
    """The min(k, len) values of largest magnitude, with their indices."""
    cdef _codec_args a = _codec_args(id=_TOPK, scaled=0, k=k, partition=0, normalize=0, rng=0)
    return _encode("topk", &a, src)

def topk_decode_add(data, dst, uint32_t k):
    cdef _codec_args a = _codec_args(id=_TOPK, scaled=0, k=k, partition=0, normalize=0, rng=0)
    _decode_add("topk", &a, data, dst)


def randomk_max_bytes(size_t count, uint32_t k):
    return rk_randomk_max_bytes(count, k)

def randomk_encode(src, uint32_t k, uint64_t rng):
    """min(k, len) values at distinct indices drawn with the splitmix64 stream
    whose state is rng.  Returns (encoding, the state after)."""
    cdef _codec_args a = _codec_args(id=_RANDOMK, scaled=0, k=k, partition=0, normalize=0, rng=rng)
    encoded = _encode("randomk", &a, src)
    return encoded, a.rng

def randomk_decode_add(data, dst, uint32_t k):
    cdef _codec_args a = _codec_args(id=_RANDOMK, scaled=0, k=k, partition=0, normalize=0, rng=0)
    _decode_add("randomk", &a, data, dst)


def dithering_max_bytes(size_t count, uint32_t levels, str partition="linear"):
    cdef _codec_args a = _dithering_args(levels, partition, "max", 0)
    return _max_bytes(&a, count)

def dithering_encode(src, uint32_t levels, str partition, str normalize, uint64_t rng):
    """Each |x| / norm stochastically rounded onto the levels (splitmix64 stream
    from state rng); returns (encoding, the state after)."""
    cdef _codec_args a = _dithering_args(levels, partition, normalize, rng)
    encoded = _encode("dithering", &a, src)
    return encoded, a.rng

def dithering_decode_add(data, dst, uint32_t levels, str partition="linear"):
    cdef _codec_args a = _dithering_args(levels, partition, "max", 0)
    _decode_add("dithering", &a, data, dst)
