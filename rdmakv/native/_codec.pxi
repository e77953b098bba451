# Gradient compression (codec.h, codec.c): a key's codec and a chunk's encoder
# state as Python objects, for the Python data path, the engines' declarations
# and the tests.  What the settings mean and how a user names them is
# rdmakv/core/compression.py's.

cdef extern from "codec.h" nogil:
    struct rk_codec:
        uint8_t kind
        uint8_t error_feedback
        uint8_t scaled
        uint8_t dither_partition
        uint8_t dither_normalize
        uint32_t k
        uint32_t levels
        float threshold
        float momentum
        uint64_t seed
    struct rk_codec_state:
        float *residual
        float *momentum
        uint64_t rng
    int rk_codec_known(const rk_codec *c)
    int rk_codec_compresses_pull(const rk_codec *c)
    size_t rk_codec_max_bytes(const rk_codec *c, size_t count)
    int rk_codec_state_init(const rk_codec *c, rk_codec_state *s, size_t count, uint64_t chunk)
    void rk_codec_state_free(rk_codec_state *s)
    size_t rk_codec_encode(const rk_codec *c, rk_codec_state *s, const float *src, size_t count, void *dst)
    int rk_codec_decode_add(const rk_codec *c, const void *src, size_t bytes, float *dst, size_t count)


cdef class Codec:
    """A key's declared compression (struct rk_codec), built from the fields of
    rdmakv.core.compression.Compression: kind, error_feedback, scaled,
    dither_partition, dither_normalize, k, levels, threshold, momentum, seed."""
    cdef rk_codec c

    def __init__(self, int kind, *, error_feedback=False, scaled=False, int dither_partition=0,
                 int dither_normalize=0, uint32_t k=0, uint32_t levels=0, float threshold=0.0,
                 float momentum=0.0, uint64_t seed=0):
        self.c.kind = kind
        self.c.error_feedback = bool(error_feedback)
        self.c.scaled = bool(scaled)
        self.c.dither_partition = dither_partition
        self.c.dither_normalize = dither_normalize
        self.c.k = k
        self.c.levels = levels
        self.c.threshold = threshold
        self.c.momentum = momentum
        self.c.seed = seed
        if not rk_codec_known(&self.c):
            raise ValueError(f"codec kind {kind} is not implemented in this build")

    @property
    def compresses_pull(self):
        return bool(rk_codec_compresses_pull(&self.c))

    def max_bytes(self, size_t count):
        """Bound on the encoding of count float32 values."""
        return rk_codec_max_bytes(&self.c, count)

    def decode_add(self, dst, src):
        """dst (float32, writable) += decode(src); ValueError when src cannot encode len(dst) values."""
        cdef Py_buffer dview
        cdef Py_buffer sview
        cdef int rc
        PyObject_GetBuffer(dst, &dview, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        try:
            PyObject_GetBuffer(src, &sview, PyBUF_ANY_CONTIGUOUS)
            try:
                if dview.len % 4:
                    raise ValueError(f"decode_add: {dview.len} bytes are not whole float32 values")
                with nogil:
                    rc = rk_codec_decode_add(&self.c, sview.buf, <size_t>sview.len, <float *>dview.buf,
                                             <size_t>(dview.len // 4))
                if rc:
                    raise ValueError(f"{sview.len} bytes are not an encoding of {dview.len // 4} values")
            finally:
                PyBuffer_Release(&sview)
        finally:
            PyBuffer_Release(&dview)


cdef class CodecState:
    """One chunk's encoder: its codec and its state (residual, momentum, random
    stream), owned here and freed with the object."""
    cdef Codec codec
    cdef rk_codec_state state
    cdef readonly size_t count

    def __init__(self, Codec codec, size_t count, uint64_t chunk=0):
        self.codec = codec
        self.count = count
        if rk_codec_state_init(&codec.c, &self.state, count, chunk):
            raise MemoryError(f"codec state for {count} values")

    def __dealloc__(self):
        rk_codec_state_free(&self.state)

    def encode(self, src, dst):
        """Encode src (count float32) into dst (max_bytes(count) writable bytes); the bytes written."""
        cdef Py_buffer sview
        cdef Py_buffer dview
        cdef size_t written
        PyObject_GetBuffer(src, &sview, PyBUF_ANY_CONTIGUOUS)
        try:
            PyObject_GetBuffer(dst, &dview, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
            try:
                if <size_t>sview.len != self.count * 4:
                    raise ValueError(f"encode: {sview.len} bytes, not {self.count} float32 values")
                if <size_t>dview.len < rk_codec_max_bytes(&self.codec.c, self.count):
                    raise ValueError(f"encode: {dview.len} bytes of room, the encoding may take "
                                     f"{rk_codec_max_bytes(&self.codec.c, self.count)}")
                with nogil:
                    written = rk_codec_encode(&self.codec.c, &self.state, <const float *>sview.buf, self.count,
                                              dview.buf)
                return written
            finally:
                PyBuffer_Release(&dview)
        finally:
            PyBuffer_Release(&sview)

    def residual(self):
        """A copy of the residual (float32 bytes), or None when the codec keeps none."""
        if self.state.residual == NULL:
            return None
        return (<char *>self.state.residual)[:self.count * 4]
