"""Split tensors into chunks and place chunks on servers.  Pure: no I/O.

Chunks are near-equal slices of at most `partition_bytes`, aligned to the page
size when they are at least a page (so the verbs path registers whole pages),
else to the item size.  Placement puts each chunk on the least-loaded server
so far (ties to the lowest index): a pure function of the declaration order, so
every worker that declares keys in the same order computes the same placement,
and the servers check that they did."""
import heapq
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
    if size == 0:
        return [(0, 0)]
    bounds = list(range(0, nbytes, size)) + [nbytes]
    return [(start, end - start) for start, end in zip(bounds, bounds[1:])]


class Placement:
    """Assigns chunks to servers, balancing bytes, in declaration order.
    `load` (bytes already placed on each server) resumes a placement: a server
    recomputes a key's chunks from the load its worker had before that key."""

    def __init__(self, num_servers, load=None):
        if num_servers < 1:
            raise ValueError("at least one server is needed")
        self.load = [0] * num_servers if load is None else list(load)

    def place(self, pieces):
        """Chunks for the [(offset, nbytes)] of one key, each on the least-loaded server."""
        # A heap of (load, server) pops the least-loaded server, ties to the lowest index.
        heap = [(load, server) for server, load in enumerate(self.load)]
        heapq.heapify(heap)
        chunks = []
        for index, (offset, nbytes) in enumerate(pieces):
            load, server = heap[0]
            heapq.heapreplace(heap, (load + max(nbytes, 1), server))  # an empty chunk still costs a message
            chunks.append(Chunk(index, offset, nbytes, server))
        for load, server in heap:
            self.load[server] = load
        return chunks
