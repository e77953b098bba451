# cython: language_level=3
"""Mechanism only: the byte-moving loops of rdmakv's transports and the
server's reduction kernel.  Every loop here runs with the GIL released; every
decision (what to send, where to receive, retries, errors with peer names)
belongs to the Python modules in rdmakv/transport/."""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE, PyBUF_ANY_CONTIGUOUS
from libc.errno cimport errno, EINTR, EAGAIN
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cimport rdmakv.native._sys as s

include "_tcp.pxi"
include "_reduce.pxi"
include "_pack.pxi"
include "_shm.pxi"
include "_verbs.pxi"
include "_verbs_stream.pxi"
include "_wire.pxi"
include "_codec.pxi"
include "_worker_engine.pxi"
include "_server_engine.pxi"
include "_codecs_byteps.pxi"
