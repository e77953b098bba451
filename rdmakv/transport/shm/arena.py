"""The arena: memory files a listener's owner allocates round buffers from, so
that connections hand co-located peers a buffer's place instead of its bytes
(see "Shared results" and "Exposed regions" in the package's documentation)."""
import errno
import fcntl
import mmap
import os
import socket
import struct
import threading

import numpy as np

from rdmakv.native import transport as _t

MiB = 1 << 20
SHARED_MIN_BYTES = 64 * 1024   # smaller payloads are cheaper to copy through the ring
SUM_CONTROL_BYTES = _t.SUM_CONTROL_BYTES
ARENA_SEGMENT_BYTES = 64 * MiB  # the arena's first memory file; each next one is as large as all before
ARENA_ALIGN = 4096
SEGMENT = struct.Struct("<IQ")  # sent with a segment's fd: its number and size


class _Segment:
    def __init__(self, number, fd, size, memory):
        self.number = number
        self.fd = fd
        self.size = size
        self.memory = memory                       # an mmap.mmap
        self.address = np.frombuffer(memory, np.uint8, 1).ctypes.data


class SharedArena:
    """Memory files the listener's owner allocates buffers from, so that
    connections can hand co-located peers a buffer's place instead of its
    bytes.  Buffers live as long as the process; segments only grow.  Each
    memory file is at least as large as all earlier ones together, so n bytes
    of buffers take O(log n) files (two descriptors each, ours and the
    mapping's) and at most about 2n of address space; the kernel commits a
    page only when it is first touched."""

    def __init__(self):
        self._segments = []
        self._used = 0                # bytes taken from the newest segment
        self._allocated = {}          # id(array) -> (array, segment, offset): find() without address maths
        self._lock = threading.Lock()
        self._closed = False

    def allocate(self, nbytes):
        """A writable uint8 array of nbytes in shared memory, after a control block
        (SUM_CONTROL_BYTES: where the server's shared sums keep their lock and round)."""
        span = -(-(SUM_CONTROL_BYTES + nbytes) // ARENA_ALIGN) * ARENA_ALIGN
        with self._lock:
            if not self._segments or self._used + span > self._segments[-1].size:
                reserved = sum(segment.size for segment in self._segments)
                self._segments.append(self._new_segment(len(self._segments),
                                                        max(ARENA_SEGMENT_BYTES, span, reserved)))
                self._used = 0
            segment, offset = self._segments[-1], self._used + SUM_CONTROL_BYTES
            self._used += span
            array = np.frombuffer(segment.memory, np.uint8, nbytes, offset)
            self._allocated[id(array)] = (array, segment, offset)
        return array

    @staticmethod
    def _new_segment(number, size):
        fd = os.memfd_create("rdmakv-shm-results", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            memory = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        return _Segment(number, fd, size, memory)

    def locate(self, payload):
        """(segment, offset) of a payload that lies wholly in the arena and is
        worth sharing, else None."""
        if self._closed:
            return None
        return self.find(payload)

    def find(self, payload):
        """(segment, offset) of an arena buffer, shared or not any more; else None."""
        if type(payload) is not np.ndarray or payload.nbytes < SHARED_MIN_BYTES or not payload.flags.c_contiguous:
            return None
        known = self._allocated.get(id(payload))
        if known is not None and known[0] is payload:
            return known[1], known[2]
        start = payload.ctypes.data
        for segment in self._segments:
            offset = start - segment.address
            if 0 <= offset and offset + payload.nbytes <= segment.size:
                return segment, offset
        return None

    def pass_segment(self, sock, segment):
        """Send a segment's fd and size over a Unix socket (under the lock, so
        close() cannot free the fd number meanwhile)."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the shared arena is closed")
            if socket.send_fds(sock, [SEGMENT.pack(segment.number, segment.size)], [segment.fd]) != SEGMENT.size:
                raise OSError(errno.EAGAIN, "the segment announcement did not fit the socket")

    def close(self):
        """Stop sharing: later payloads go through the rings; mappings stay while buffers do."""
        with self._lock:
            self._closed = True
            for segment in self._segments:
                if segment.fd >= 0:
                    os.close(segment.fd)
                    segment.fd = -1
