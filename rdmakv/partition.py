"""Split tensors into chunks and place chunks on servers.  Pure: no I/O.

Chunks are near-equal slices of at most `partition_bytes`, aligned to the page
size when they are at least a page (so the verbs path registers whole pages),
else to the item size.  Placement puts each chunk on the least-loaded server
so far (ties to the lowest index): a pure function of the declaration order, so
every worker that declares keys in the same order computes the same placement,
and the servers check that they did."""
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


class Placement:
    """Assigns chunks to servers, balancing bytes, in declaration order."""

    def __init__(self, num_servers):
        if num_servers < 1:
            raise ValueError("at least one server is needed")
        self.load = [0] * num_servers

    def place(self, pieces):
        """Chunks for the [(offset, nbytes)] of one key, each on the least-loaded server."""
        chunks = []
        for index, (offset, nbytes) in enumerate(pieces):
            server = min(range(len(self.load)), key=lambda s: (self.load[s], s))
            self.load[server] += max(nbytes, 1)  # an empty chunk still costs a message
            chunks.append(Chunk(index, offset, nbytes, server))
        return chunks
