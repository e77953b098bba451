"""Split tensors into chunks and place chunks on servers.  Pure: no I/O.

Chunks are near-equal slices of at most `partition_bytes`, aligned to the page
size when they are at least a page (so the verbs path registers whole pages),
else to the item size.  Placement is a pure function of the key and the chunk
index: a key's chunks go round-robin over the servers, starting at a server
chosen by the key's wire hash.  Every worker computes the same placement
whatever order its threads declare keys in, and the servers check that they
did.  A key's bytes are balanced within one chunk; across keys the balance is
that of the hash (as with BytePS' default key hashing)."""
import math
from collections import namedtuple

PAGE = 4096

Chunk = namedtuple("Chunk", "index offset nbytes server")


def split(nbytes, itemsize, partition_bytes):
    """[(offset, nbytes), ...] covering [0, nbytes) exactly once; one empty chunk for an empty tensor."""
    if nbytes < 0 or itemsize <= 0 or nbytes % itemsize:
        raise ValueError(f"cannot split {nbytes} bytes into {itemsize}-byte items")
    if partition_bytes < itemsize:
        raise ValueError(f"partition size {partition_bytes} is smaller than one {itemsize}-byte item")
    if nbytes == 0:
        return [(0, 0)]
    count = math.ceil(nbytes / partition_bytes)
    align = PAGE if partition_bytes >= PAGE else itemsize
    size = math.ceil(nbytes / count / align) * align
    size = min(size, partition_bytes - partition_bytes % align)
    bounds = list(range(0, nbytes, size)) + [nbytes]
    return [(start, end - start) for start, end in zip(bounds, bounds[1:])]


def place(wire, pieces, num_servers):
    """Chunks for the [(offset, nbytes)] of the key whose wire hash is `wire`."""
    if num_servers < 1:
        raise ValueError("at least one server is needed")
    return [Chunk(index, offset, nbytes, (wire + index) % num_servers)
            for index, (offset, nbytes) in enumerate(pieces)]
