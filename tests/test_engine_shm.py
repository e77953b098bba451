"""The native engines over shared memory: the rings of a real ShmChannel pair
(one end the engine's, the other played by the test), the Unix socket beside
them carrying memory files, shared results read in place, and sums co-located
workers add into themselves; what a hostile or vanished peer makes of them."""
import mmap
import os
import socket
import struct

import numpy as np
import pytest

from rdmakv.core import protocol
from rdmakv.core.protocol import Op
from rdmakv.native import transport as _t
from rdmakv.transport.shm.arena import SharedArena
# The engines' names (wire.h) for the frames the shm layer calls EXPOSE, EXPOSED and IN_PLACE.
from rdmakv.transport.shm.connection import EXPOSE as SUM_OFFER, EXPOSED as SUM_PLACES, IN_PLACE as SUMMED
from rdmakv.transport.shm.connection import PLACE, SHARED_PAYLOAD

from socket_helpers import recv_exactly

TIMEOUT = 10.0
SHORT = 0.5                   # an engine whose waits for a peer's memory file end soon
INT32 = protocol.DTYPE_CODES["int32"]
INT64 = protocol.DTYPE_CODES["int64"]
PRIVATE = SHARED_PAYLOAD | SUM_OFFER | SUMMED


class Rings:
    """One shared-memory channel: `ours` for the engine, `theirs` for the test."""

    def __init__(self, ring_bytes=1 << 16):
        self.ours_sock, self.theirs_sock = socket.socketpair()
        memfd = os.memfd_create("rdmakv-test-rings", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, _t.shm_segment_bytes(ring_bytes))
            self.ours = _t.ShmChannel(memfd, self.ours_sock.fileno(), ring_bytes, True)
            self.theirs = _t.ShmChannel(memfd, self.theirs_sock.fileno(), ring_bytes, False)
            self._memory = mmap.mmap(memfd, _t.shm_segment_bytes(ring_bytes))
        finally:
            os.close(memfd)
        self.ring_bytes = ring_bytes
        # The head counter of the ring the test writes (the second side's), as the engine sees it.
        self.inbound_head = np.frombuffer(self._memory, np.uint32, 1, _t.SHM_CONTROL_BYTES + ring_bytes)

    def send(self, op, payload=b"", private=0, **fields):
        header = bytearray(protocol.pack(op, length=fields.pop("length", len(payload)), **fields))
        struct.pack_into("<I", header, protocol.FLAGS_OFFSET,
                         struct.unpack_from("<I", header, protocol.FLAGS_OFFSET)[0] | private)
        self.theirs.send_frame(bytes(header), payload or None, TIMEOUT)

    def read(self, payload=True):
        """(header without private flags, the private flags, payload) of the engine's next frame."""
        raw = bytearray(protocol.HEADER_SIZE)
        self.theirs.recv_into(raw, TIMEOUT)
        flags = struct.unpack_from("<I", raw, protocol.FLAGS_OFFSET)[0]
        struct.pack_into("<I", raw, protocol.FLAGS_OFFSET, flags & ~PRIVATE)
        header = protocol.unpack(raw)
        data = bytearray(header.length if payload and not flags & SUMMED else 0)
        if flags & SHARED_PAYLOAD:
            data = bytearray(PLACE.size)
        if data:
            self.theirs.recv_into(data, TIMEOUT)
        return header, flags & PRIVATE, bytes(data)

    def close(self):
        self.theirs.shutdown()
        self.ours.shutdown()
        self.ours.unmap()
        self.theirs.unmap()
        self.ours_sock.close()
        self.theirs_sock.close()
        del self.inbound_head
        self._memory.close()


def shared_buffers(arena, nbytes, count=2):
    return [arena.allocate(nbytes) for _ in range(count)]


def sum_lock(arena, buffer):
    """The lock word of a shared sum, in the control block before its buffer (_shm.h)."""
    segment, offset = arena.find(buffer)
    return np.frombuffer(segment.memory, np.uint32, 1, offset - _t.SUM_CONTROL_BYTES)


def pass_segments(arena, sock, buffers):
    """Send the memory files holding buffers (each once), as a listener's connection does."""
    sent = set()
    for buffer in buffers:
        segment, _ = arena.find(buffer)
        if segment.number not in sent:
            arena.pass_segment(sock, segment)
            sent.add(segment.number)


def offer(arena, rings, wire, chunk, buffers, engine=None):
    """Offer the sums; with engine, return once its reader has taken the offer in."""
    pass_segments(arena, rings.theirs_sock, buffers)
    (even, even_offset), (odd, odd_offset) = (arena.find(b) for b in buffers)
    rings.send(Op.PUSH, SUM_PLACES.pack(even.number, even_offset, odd.number, odd_offset, buffers[0].nbytes),
               private=SUM_OFFER, key=wire, chunk=chunk)
    if engine is not None:                    # frames are read in order: a control message after it
        rings.send(Op.WAITING, b"{}", key=wire)
        assert engine.next_event(TIMEOUT)[1] == _t.EVENT_MESSAGE


class WorkerRig:
    def __init__(self, timeout=TIMEOUT):
        self.engine = _t.Engine(1, 0, 64 * 1024, timeout, 3)
        self.rings = Rings()
        self.engine.start_link(0, self.rings.ours_sock.fileno(), self.rings.ours)
        self.arena = SharedArena()

    def offered_key(self, wire, nbytes):
        """A one-chunk int32 key whose two round sums the server (the test) offered."""
        key = self.engine.add_key(wire, 0, INT32, [0], [nbytes], [0])
        sums = shared_buffers(self.arena, nbytes)
        offer(self.arena, self.rings, wire, 0, sums, self.engine)
        return key, sums

    def close(self):
        self.engine.fail_link(_t.ENGINE_ALL_LINKS, _t.OUTCOME_CANCELLED)
        self.engine.close()
        self.engine.reap()
        self.rings.close()
        self.arena.close()


@pytest.fixture
def worker_rig(closing):
    return lambda **kwargs: closing(WorkerRig(**kwargs))


def test_a_pushpull_crosses_the_rings_both_ways(worker_rig):
    r = worker_rig()
    key = r.engine.add_key(0xAB, 0, INT32, [0, 20], [20, 12], [0, 0])
    source = np.arange(8, dtype=np.int32)
    target = np.zeros(8, np.int32)
    op = r.engine.submit(key, source, target, 0, 0)
    pushes = [r.rings.read() for _ in range(2)]
    assert [(h.op, h.chunk, private, payload) for h, private, payload in pushes] == [
        (Op.PUSH, 0, 0, source[:5].tobytes()), (Op.PUSH, 1, 0, source[5:].tobytes())]
    r.rings.send(Op.RESULT, (source[:5] * 2).tobytes(), key=0xAB, chunk=0, dtype=INT32)
    r.rings.send(Op.RESULT, (source[5:] * 2).tobytes(), key=0xAB, chunk=1, dtype=INT32)
    assert op.wait(TIMEOUT) and op.outcome == (_t.OUTCOME_OK, 0)
    np.testing.assert_array_equal(target, source * 2)


def test_a_result_is_read_in_place_from_the_servers_memory(worker_rig):
    r = worker_rig()
    nbytes = 256 * 1024
    key = r.engine.add_key(5, 0, INT32, [0], [nbytes], [0])
    result, = shared_buffers(r.arena, nbytes, 1)
    result.view(np.int32)[:] = np.arange(nbytes // 4, dtype=np.int32) * 3
    target = np.zeros(nbytes // 4, np.int32)
    op = r.engine.submit(key, np.ones(nbytes // 4, np.int32), target, 0, 0)
    r.rings.read()
    pass_segments(r.arena, r.rings.theirs_sock, [result])
    segment, offset = r.arena.find(result)
    r.rings.send(Op.RESULT, PLACE.pack(segment.number, offset), private=SHARED_PAYLOAD, length=nbytes, key=5,
                 dtype=INT32)
    assert op.wait(TIMEOUT) and op.outcome == (_t.OUTCOME_OK, 0)
    np.testing.assert_array_equal(target, np.arange(nbytes // 4, dtype=np.int32) * 3)


def test_a_push_is_added_into_the_sum_the_server_offered_and_only_its_header_crosses(worker_rig):
    r = worker_rig()
    nbytes = 128 * 1024
    key, sums = r.offered_key(6, nbytes)
    mine = np.arange(nbytes // 4, dtype=np.int32)
    theirs = np.full(nbytes // 4, 1000, np.int32)
    for rnd in range(3):                      # even, odd, and even again: a new round copies first
        target = np.zeros_like(mine)
        op = r.engine.submit(key, mine + rnd, target, 0, 0)
        header, private, _ = r.rings.read()
        assert (header.op, header.round, header.length, private) == (Op.PUSH, rnd, nbytes, SUMMED)
        segment, offset = r.arena.find(sums[rnd % 2])
        _t.sum_into_shared(segment.memory, offset, theirs, INT32, rnd, TIMEOUT)   # another co-located worker
        np.testing.assert_array_equal(sums[rnd % 2].view(np.int32), mine + rnd + theirs)
        r.rings.send(Op.RESULT, PLACE.pack(segment.number, offset), private=SHARED_PAYLOAD, length=nbytes, key=6,
                     dtype=INT32, round=rnd)
        assert op.wait(TIMEOUT) and op.outcome == (_t.OUTCOME_OK, 0)
        np.testing.assert_array_equal(target, mine + rnd + theirs)
    assert r.engine.summed_bytes(0) == 3 * nbytes


def test_a_sum_left_locked_by_a_dead_worker_gets_the_pushs_bytes_and_the_link_goes_on(worker_rig):
    r = worker_rig()
    nbytes = 128 * 1024
    key, sums = r.offered_key(6, nbytes)
    lock = sum_lock(r.arena, sums[0])
    lock[0] = 1                               # its holder died inside the sum
    value = np.arange(nbytes // 4, dtype=np.int32)
    op = r.engine.submit(key, value, value.copy(), 0, 0)
    header, private, payload = r.rings.read()
    assert (header.op, private, payload) == (Op.PUSH, 0, value.tobytes())   # the server adds it, or refuses
    lock[0] = 0
    r.rings.send(Op.RESULT, value.tobytes(), key=6, dtype=INT32)
    assert op.wait(TIMEOUT) and op.outcome == (_t.OUTCOME_OK, 0)


def test_after_a_cancelled_round_a_push_is_not_added_over_a_result_others_may_still_read():
    # Chunk 0 of the key has a shared sum on link 0, chunk 1 lives on link 1.  Round 1 is
    # cancelled when link 1 fails; round 2's chunk 0 must not be added into the buffer
    # that still holds round 0's result (a slower co-located worker may not have it yet).
    engine = _t.Engine(2, 0, 64 * 1024, TIMEOUT, 3)
    rings, arena = Rings(1 << 20), SharedArena()
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        engine.start_link(0, rings.ours_sock.fileno(), rings.ours)
        engine.start_link(1, ours.fileno())
        nbytes = 128 * 1024                   # above what a submitting thread sends itself
        key = engine.add_key(6, 0, INT32, [0, nbytes], [nbytes, 4], [0, 1])
        sums = shared_buffers(arena, nbytes)
        offer(arena, rings, 6, 0, sums, engine)
        value = np.arange(nbytes // 4 + 1, dtype=np.int32)
        op = engine.submit(key, value, value.copy(), 0, 0)
        assert rings.read()[1] == SUMMED      # round 0, added in place
        segment, offset = arena.find(sums[0])
        rings.send(Op.RESULT, PLACE.pack(segment.number, offset), private=SHARED_PAYLOAD, length=nbytes, key=6,
                   dtype=INT32)
        theirs.sendall(protocol.pack(Op.RESULT, length=4, key=6, chunk=1, dtype=INT32) + value[-1:].tobytes())
        assert op.wait(TIMEOUT) and op.outcome == (_t.OUTCOME_OK, 0)
        round_zero = sums[0].copy()
        cancelled = engine.submit(key, value, value.copy(), 0, 0)
        assert rings.read()[1] == SUMMED      # round 1, into the other buffer
        engine.fail_link(1, _t.OUTCOME_LINK_FAILED)
        assert cancelled.wait(TIMEOUT) and cancelled.outcome == (_t.OUTCOME_LINK_FAILED, 1)
        engine.fail_link(0, _t.OUTCOME_LINK_FAILED)   # (only so that the next op can be failed too)
        later = engine.submit(key, value * 5, value.copy(), 0, 0)
        assert later.wait(TIMEOUT)
        np.testing.assert_array_equal(sums[0], round_zero)
    finally:
        engine.fail_link(_t.ENGINE_ALL_LINKS, _t.OUTCOME_CANCELLED)
        engine.close()
        engine.reap()
        rings.close()
        arena.close()
        ours.close()
        theirs.close()


def _place_never_sent(r, nbytes):
    r.rings.send(Op.RESULT, PLACE.pack(7, 64), private=SHARED_PAYLOAD, length=nbytes, key=8, dtype=INT32)


def _place_outside_its_segment(r, nbytes):
    result, = shared_buffers(r.arena, nbytes, 1)
    pass_segments(r.arena, r.rings.theirs_sock, [result])
    segment, _ = r.arena.find(result)
    r.rings.send(Op.RESULT, PLACE.pack(segment.number, segment.size - 8), private=SHARED_PAYLOAD, length=nbytes,
                 key=8, dtype=INT32)


def _place_in_a_file_that_can_shrink(r, nbytes):
    # A plain file, not a sealed memory file: the server could truncate it under our reads.
    with open(os.path.join(r.tmp, "not-sealed"), "w+b") as file:
        file.truncate(1 << 20)
        r.rings.theirs_sock.sendmsg([struct.pack("<IQ", 0, 1 << 20)],
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", file.fileno()))])
    r.rings.send(Op.RESULT, PLACE.pack(0, 4096), private=SHARED_PAYLOAD, length=nbytes, key=8, dtype=INT32)


def _offer_for_a_chunk_not_ours(r, nbytes):
    offer(r.arena, r.rings, 9999, 0, shared_buffers(r.arena, nbytes))


def _offer_inside_a_control_block(r, nbytes):
    sums = shared_buffers(r.arena, nbytes)
    pass_segments(r.arena, r.rings.theirs_sock, sums)
    segment, offset = r.arena.find(sums[0])
    r.rings.send(Op.PUSH, SUM_PLACES.pack(segment.number, offset - 32, segment.number, offset, nbytes),
                 private=SUM_OFFER, key=8)


def _summed_flag_on_a_result(r, nbytes):
    r.rings.send(Op.RESULT, private=SUMMED, length=nbytes, key=8, dtype=INT32)


def _ring_counters_that_cannot_be(r, nbytes):
    # The peer claims to have written more than the ring holds: nothing is read past it.
    head = r.rings.inbound_head
    head[0] = head[0] + 2 * r.rings.ring_bytes


@pytest.mark.parametrize("attack, error", [
    (_place_never_sent, "ERR_SHARED"),
    (_place_outside_its_segment, "ERR_SHARED"),
    (_place_in_a_file_that_can_shrink, "ERR_SHARED"),
    (_offer_for_a_chunk_not_ours, "ERR_SHARED"),
    (_offer_inside_a_control_block, "ERR_SHARED"),
    (_summed_flag_on_a_result, "ERR_SHARED"),
    (_ring_counters_that_cannot_be, "ERR_CORRUPT"),
])
def test_a_hostile_server_over_shared_memory_breaks_only_its_link(worker_rig, attack, error, tmp_path):
    r = worker_rig(timeout=SHORT)
    r.tmp = str(tmp_path)
    nbytes = 64 * 1024
    key = r.engine.add_key(8, 0, INT32, [0], [nbytes], [0])
    target = np.zeros(nbytes // 4, np.int32)
    op = r.engine.submit(key, np.ones(nbytes // 4, np.int32), target, 0, 0)
    r.rings.read()
    attack(r, nbytes)
    link, kind, code, _, _, _, _ = r.engine.next_event(TIMEOUT)
    assert (link, kind, code) == (0, _t.EVENT_CLOSED, getattr(_t, error))
    r.engine.fail_link(0, _t.OUTCOME_LINK_FAILED)
    assert op.wait(TIMEOUT) and op.outcome == (_t.OUTCOME_LINK_FAILED, 0)
    assert not target.any()


def test_a_vanished_server_ends_the_link_and_close_wakes_a_sleeping_reader(worker_rig):
    r = worker_rig()
    r.rings.theirs_sock.close()               # its process died: the socket beside the rings ends
    link, kind, code, _, _, _, _ = r.engine.next_event(TIMEOUT)
    assert (link, kind, code) == (0, _t.EVENT_CLOSED, _t.ERR_EOF)
    other = worker_rig()
    other.engine.close()                      # its reader sleeps on the ring: close must not wait for it
    code, err = other.engine.send(0, protocol.pack(Op.HEARTBEAT))
    assert (code, err) == (_t.ERR_IO, 9)      # EBADF: the rings are the caller's again


class ServerRig:
    """A server engine: worker 0 over shared memory, worker 1 over a socket pair."""

    def __init__(self, timeout=TIMEOUT):
        self.engine = _t.ServerEngine(2, timeout, 64 * 1024)
        self.rings = Rings(1 << 20)
        self.engine.start_link(0, self.rings.ours_sock.fileno(), self.rings.ours)
        self.tcp_ours, self.tcp = socket.socketpair()
        self.tcp_ours.setblocking(False)
        self.tcp.settimeout(TIMEOUT)
        self.engine.start_link(1, self.tcp_ours.fileno())
        self.arena = SharedArena()

    def shared_chunk(self, wire, nbytes, dtype="int64"):
        key = self.engine.add_key(wire)
        buffers = shared_buffers(self.arena, nbytes)
        places = [(self.arena.find(b)[0].number, self.arena.find(b)[1]) for b in buffers]
        self.engine.add_chunk(key, 0, protocol.DTYPE_CODES[dtype], *buffers, places)
        for rank in range(2):
            self.engine.declared_by(key, rank)
        return buffers

    def give_segments(self, buffers):
        pass_segments(self.arena, self.rings.theirs_sock, buffers)
        for buffer in buffers:
            self.engine.link_has_segment(0, self.arena.find(buffer)[0].number)

    def close(self):
        self.engine.close()
        self.rings.close()
        self.tcp_ours.close()
        self.tcp.close()
        self.arena.close()


@pytest.fixture
def server_rig(closing):
    return lambda **kwargs: closing(ServerRig(**kwargs))


def tcp_push(sock, wire, values, rnd):
    payload = values.tobytes()
    sock.sendall(protocol.pack(Op.PUSH, length=len(payload), key=wire, round=rnd,
                               dtype=protocol.DTYPE_CODES[values.dtype.name], sender=1) + payload)


def tcp_read(sock):
    header = protocol.unpack(recv_exactly(sock, protocol.HEADER_SIZE))
    return header, recv_exactly(sock, header.length)


def test_the_server_sums_pushes_added_in_place_with_pushes_that_crossed_a_socket(server_rig):
    r = server_rig()
    nbytes = 512 * 1024
    sums = r.shared_chunk(4, nbytes)
    r.give_segments(sums)
    co_located = np.arange(nbytes // 8, dtype=np.int64) * 7
    remote = np.full(nbytes // 8, -3, np.int64)
    for rnd in range(3):
        order = [0, 1] if rnd % 2 else [1, 0]  # whichever comes first, its contribution is copied in
        for rank in order:
            if rank == 0:
                segment, offset = r.arena.find(sums[rnd % 2])
                _t.sum_into_shared(segment.memory, offset, co_located + rnd, INT64, rnd, TIMEOUT)
                r.rings.send(Op.PUSH, private=SUMMED, length=nbytes, key=4, round=rnd, dtype=INT64)
            else:
                tcp_push(r.tcp, 4, remote, rnd)
        expected = co_located + rnd + remote
        header, private, place = r.rings.read()
        assert (header.op, header.round, private) == (Op.RESULT, rnd, SHARED_PAYLOAD)
        assert PLACE.unpack(place) == (r.arena.find(sums[rnd % 2])[0].number, r.arena.find(sums[rnd % 2])[1])
        np.testing.assert_array_equal(sums[rnd % 2].view(np.int64), expected)
        header, payload = tcp_read(r.tcp)
        assert (header.op, header.round) == (Op.RESULT, rnd)
        np.testing.assert_array_equal(np.frombuffer(payload, np.int64), expected)


def test_a_push_summed_in_place_without_the_memory_is_a_broken_worker(server_rig):
    r = server_rig()
    r.shared_chunk(4, 64 * 1024)              # its memory files never went to worker 0
    r.rings.send(Op.PUSH, private=SUMMED, length=64 * 1024, key=4, dtype=INT64)
    rank, kind, code, _, _, _, _ = r.engine.next_event(TIMEOUT)
    assert (rank, kind, code) == (0, _t.EVENT_CLOSED, _t.ERR_SHARED)


def test_a_sum_left_locked_by_a_co_located_worker_refuses_the_push_that_waits(server_rig):
    r = server_rig(timeout=SHORT)
    sums = r.shared_chunk(4, 64 * 1024)
    lock = sum_lock(r.arena, sums[0])
    lock[0] = 1                               # held by a worker that stopped inside it
    tcp_push(r.tcp, 4, np.ones(64 * 1024 // 8, np.int64), 0)
    rank, kind, code, _, _, fields, _ = r.engine.next_event(TIMEOUT)
    assert (rank, kind, code, fields[5]) == (1, _t.EVENT_REFUSED, _t.REFUSE_SUM_STALLED, 4)
    lock[0] = 0
