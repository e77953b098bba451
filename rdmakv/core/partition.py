"""Split tensors into chunks and place chunks on servers.  Pure: no I/O.

Chunks are near-equal slices of at most `partition_bytes`, aligned to the page
size when they are at least a page (so the verbs path registers whole pages),
else to the item size.  Placement is a pure function of the key and the chunk
index (server_of): a key's chunks go round-robin over the servers, starting at
a server chosen by the key's wire hash.  Every worker computes the same
placement whatever order its threads declare keys in; the servers recompute it
from the DECLARE with the same function and check that workers agree.  A key's
bytes are balanced within one chunk; across keys the balance is that of the
hash (as with BytePS' default key hashing)."""
import math
from collections import namedtuple

PAGE = 4096

Chunk = namedtuple("Chunk", "index offset nbytes server")


def chunk_size(nbytes, itemsize, partition_bytes):
    """The size of every chunk of an nbytes tensor but the last (which may be
    smaller); split() makes ceil(nbytes / size) chunks, at least one."""
    if nbytes < 0 or itemsize <= 0 or nbytes % itemsize:
        raise ValueError(f"cannot split {nbytes} bytes into {itemsize}-byte items")
    if partition_bytes < itemsize:
        raise ValueError(f"partition size {partition_bytes} is smaller than one {itemsize}-byte item")
    if nbytes == 0:
        return 0
    count = math.ceil(nbytes / partition_bytes)
    align = PAGE if partition_bytes >= PAGE else itemsize
    size = math.ceil(nbytes / count / align) * align
    return min(size, partition_bytes - partition_bytes % align)


def chunk_count(nbytes, size):
    """How many chunks pieces(nbytes, size) makes."""
    return -(-nbytes // size) if size else 1


def split(nbytes, itemsize, partition_bytes):
    """[(offset, nbytes), ...] covering [0, nbytes) exactly once; one empty chunk for an empty tensor."""
    return pieces(nbytes, chunk_size(nbytes, itemsize, partition_bytes))


def pieces(nbytes, size):
    """[(offset, nbytes), ...]: [0, nbytes) cut into chunks of size bytes, the last one shorter."""
    return [piece(nbytes, size, index) for index in range(chunk_count(nbytes, size))]


def piece(nbytes, size, index):
    """pieces(nbytes, size)[index], without making the list; index < chunk_count(nbytes, size)."""
    offset = index * size
    return offset, min(size, nbytes - offset)


def server_of(wire, index, num_servers):
    """The server of chunk `index` of the key whose wire hash is `wire`: the
    placement rule, for workers and servers alike."""
    if num_servers < 1:
        raise ValueError("at least one server is needed")
    return (wire + index) % num_servers


def place(wire, pieces, num_servers):
    """Chunks for the [(offset, nbytes)] of the key whose wire hash is `wire`."""
    return [Chunk(index, offset, nbytes, server_of(wire, index, num_servers))
            for index, (offset, nbytes) in enumerate(pieces)]


