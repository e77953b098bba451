"""How a sum is made, on the Python data path: the one place to read for it.
(The native engines do the same in C: server_engine.c's take_push, and
worker_engine.c for a co-located worker's own push; both call _shm.h's
rdmakv_sum_contribute for shared sums.)

A chunk held by a server has two round buffers, used by alternate rounds:
round r's sum is built in buffer round_buffer(r) = r % 2.  A worker pushes
round r + 1 only after it has round r's result, so while round r + 1 is summed
round r's result can still be going out to slower workers, and by the time
round r + 2 reuses a buffer every worker has copied round r's result out of it.

Private sums (TCP, verbs, and shared memory where a buffer cannot be shared):
the round's first push is copied into the buffer (or received straight into
it: the server's destination()), every later one is added into it by
add_into (_reduce.h, vectorized for every dtype; integers wrap like numpy's).

Shared sums (shared memory): the round buffers come from the listener's
allocate() and are exposed to co-located workers under the tag stream of the
chunk's pushes.  Such a sum is built under the lock in the 64-byte control
block before the buffer (_shm.h), which also records the round the buffer
holds, so whoever contributes first in a round copies and every later
contributor adds: the server for pushes that reach it as bytes (contribute),
a co-located worker for its own push (push_in_place), which then sends only
the push's header (Connection.send(in_place=True)).  Co-located workers thus
write into the server's round buffers: same-user processes holding the cluster
secret are trusted that far (RDMAKV_SHM=0 on a worker keeps it out).  Only a
whole chunk of plain pushpull is added in place; broadcasts go as bytes.

Compressed chunks (rdmakv/core/compression.py, native/codec.c) are private
sums: a pushpull's push arrives encoded and is decoded into the round's buffer
(add_encoded; the engines: server_engine.c's contribute), never added in place
by a worker; where the codec compresses the pull too, the finished sum is
encoded (encode_sum) and that goes out.  A broadcast's value goes whole.

Host sums (one push per host, rdmakv/control/hierarchy.py): the same control
block and lock, one level up, on the workers' side only: a host's workers add
their pushes into a buffer of their host (_shm.h's rdmakv_host_contribute), its
local root adds its own once theirs are in (rdmakv_host_complete) and pushes
that sum as its push, which the server takes like any other; the root writes the
result back into the same buffer (rdmakv_host_publish) and the others copy it out
(rdmakv_host_take).  worker_engine.c runs those steps, rdmakv/worker/host_sums.py
makes the memory."""
from rdmakv.core.protocol import FLAG_ACK
from rdmakv.native import transport as _t

ROUND_BUFFERS = 2


def round_buffer(rnd):
    """Which of a chunk's round buffers holds round rnd's sum."""
    return rnd % ROUND_BUFFERS


def add(target, payload, dtype_code, first):
    """A private sum: the round's first contribution copied, later ones added."""
    if first:
        target[:] = payload
    else:
        _t.add_into(target, payload, dtype_code)


def add_encoded(target, payload, codec, first):
    """A compressed push decoded into a private sum (zeroed first by the round's
    first contribution); False, the sum untouched, when payload is no encoding of it."""
    if first:
        target[:] = 0
    try:
        codec.decode_add(target, payload)
    except ValueError:
        return False
    return True


def encode_sum(chunk, target):
    """The finished round's result in target (the sum, or an optimizer's weight), encoded
    for the pull into its round buffer's own place (ChunkState.pulled): the bytes to send."""
    slot = round_buffer(chunk.round)
    if chunk.pulled is None:
        chunk.pulled = [None] * ROUND_BUFFERS
    if chunk.pulled[slot] is None:
        chunk.pulled[slot] = bytearray(chunk.codec.max_bytes(chunk.nbytes // 4))
    return memoryview(chunk.pulled[slot])[:chunk.encoder.encode(target, chunk.pulled[slot])]


def contribute(region, source, dtype_code, rnd, timeout):
    """Contribute source to round rnd's shared sum in `region` (a transport
    Region) under its lock, GIL released: copied as the round's first
    contribution, else added.  TimeoutError when another contributor holds the
    lock for `timeout` seconds; ConnectionAbortedError if the region's
    connection closes locally meanwhile."""
    _t.sum_into_shared(region.memory, region.offset, source, dtype_code, rnd, timeout, region.stop)


def push_in_place(connection, tag, dtype_code, flags, payload, timeout):
    """A worker's push of `tag` added into the shared sum the server exposed for
    it, where it exposed one and the push is a whole plain one; returns the bytes
    added (the caller then sends the header in_place), or 0 (it sends the bytes)."""
    if flags & ~FLAG_ACK:
        return 0
    regions = connection.peer_regions(tag.stream)
    nbytes = memoryview(payload).nbytes
    if regions is None or regions[0].nbytes != nbytes:
        return 0
    connection.guard("add to the shared sum of", contribute, regions[round_buffer(tag.sequence)], payload,
                     dtype_code, tag.sequence, timeout)
    return nbytes
