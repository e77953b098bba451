"""Keys: their names, their wire keys, and their layout (chunks and the
servers that sum them), fixed when a key is declared."""
from __future__ import annotations

import hashlib
import math
from collections import deque
from typing import Union

import numpy as np

from rdmakv.core import partition, protocol
from rdmakv.core.compression import NONE
from rdmakv.native import transport as _t

DTYPE_CODE_OF = {np.dtype(name): code for name, code in protocol.DTYPE_CODES.items()}
Key = Union[str, int]
"""A key: 3 and "3" are different keys."""


def key_name(key):
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"keys are str or int, not {type(key).__name__}")
    return key if isinstance(key, str) else f"#{key}"


def wire_key(key):
    tag = ("s:" + key) if isinstance(key, str) else f"i:{key}"
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=8).digest(), "little")


class ChunkEncoder:
    """A compressed chunk on the Python data path: its encoder (CodecState, whose
    residual and momentum live here) and the buffers its push's encoding and, where
    the codec compresses the pull too, its encoded result pass through.  A key's
    rounds never overlap, so one of each serves every round."""

    def __init__(self, codec, chunk):
        count = chunk.nbytes // 4
        self.codec = codec
        self.state = _t.CodecState(codec, count, chunk.index)
        self.max_bytes = codec.max_bytes(count)
        self.encoded = bytearray(self.max_bytes)
        self.pulled = bytearray(self.max_bytes) if codec.compresses_pull else None

    def encode(self, source):
        """The encoding of source (the chunk's float32 bytes), a view of self.encoded."""
        return memoryview(self.encoded)[:self.state.encode(source, self.encoded)]


class KeyInfo:
    """A declared key: its layout, its failure if a server refused it, and on
    the Python data path the order of its rounds."""

    def __init__(self, key, wire, order, dtype, shape, nbytes, chunks, compression=NONE):
        self.key = key
        self.key_type = type(key)     # a lookup's key must be this type too: True == 1, numpy.int64(1) == 1
        self.name = key_name(key)
        self.wire = wire
        self.order = order
        self.dtype = dtype
        self.dtype_code = DTYPE_CODE_OF[dtype]
        self.shape = shape
        self.nbytes = nbytes
        self.chunks = chunks
        self.next_round = 0
        self.active = None            # the operation whose chunks are out
        self.waiting = deque()        # later rounds, started in turn
        self.error = None
        self.engine_key = None        # the key as the native engine knows it, where it runs
        self.compression = compression   # rdmakv.core.compression.Compression
        # Python data path, compressed keys: per chunk, its encoder (CodecState) and
        # the buffers its push and (where the pull is compressed too) its result pass through.
        self.encoders = None

    @classmethod
    def lay_out(cls, key, wire, order, dtype, shape, partition_bytes, num_servers, compression=NONE):
        """(KeyInfo, the DECLARE payload) of a new key: chunks of at most
        partition_bytes placed on the servers."""
        name = key_name(key)
        nbytes = math.prod(shape) * dtype.itemsize
        partition_bytes = min(partition_bytes, protocol.MAX_CHUNK_BYTES)
        size = partition.chunk_size(nbytes, dtype.itemsize, partition_bytes)
        count = partition.chunk_count(nbytes, size)
        if count > protocol.MAX_KEY_CHUNKS:
            raise ValueError(f"key {name!r} ({nbytes} bytes) would be split into {count} chunks of at most "
                             f"{partition_bytes} bytes; a key may have at most {protocol.MAX_KEY_CHUNKS} "
                             f"(raise RDMAKV_PARTITION_BYTES)")
        layout = protocol.declaration(wire, name, dtype.name, shape, size, compression.wire())
        chunks = partition.place(wire, partition.pieces(nbytes, size), num_servers)
        return cls(key, wire, order, dtype, shape, nbytes, chunks, compression), layout

    def codecs(self):
        """The native Codec of each chunk (a compressed key's)."""
        return [self.compression.codec(chunk.nbytes // self.dtype.itemsize) for chunk in self.chunks]

    def chunks_per_server(self, totals):
        """Add this key's (bytes, chunks) per server into totals ([[bytes, chunks], ...])."""
        for chunk in self.chunks:
            totals[chunk.server][0] += chunk.nbytes
            totals[chunk.server][1] += 1
