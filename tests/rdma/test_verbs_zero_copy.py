"""The native engines' zero copy over verbs (RK_PLACE_RESULT / RK_PLACED,
rdmakv/native/wire.h) against peers played by the test over real verbs
streams in the soft-RoCE VM: what a push that asks for its result to be
placed looks like, and what a peer that abuses the flags makes of it."""
import struct
import types

import numpy as np
import pytest

from rdmakv.core import protocol
from rdmakv.core.protocol import Op
from rdmakv.transport.verbs import devices as verbs_devices

USABLE, REASON = verbs_devices.probe()
pytestmark = [pytest.mark.rdma, pytest.mark.skipif(not USABLE, reason=f"no usable RDMA device: {REASON}")]

TIMEOUT = 20.0
PLACE_RESULT = 1 << 28                  # wire.h: RK_PLACE_RESULT
PLACED = 1 << 27                        # wire.h: RK_PLACED
LARGE = 64 * 1024                       # worker_engine.h: RK_ZERO_COPY_BYTES


def _t():
    from rdmakv.native import transport
    return transport


def read_raw(connection, nbytes):
    """nbytes off the stream, whatever flags they carry (protocol.unpack refuses ours)."""
    data = bytearray(nbytes)
    connection.recv_payload(types.SimpleNamespace(length=nbytes), data)
    return bytes(data)


def raw_header(connection):
    return protocol.HEADER.unpack(read_raw(connection, protocol.HEADER_SIZE))


def send_raw(connection, op, payload=b"", flags=0, length=None, **fields):
    """A frame with any flags: packed without them, then the bits set in place."""
    header = bytearray(protocol.pack(op, length=len(payload) if length is None else length, **fields))
    struct.pack_into("<I", header, 8, struct.unpack_from("<I", header, 8)[0] | flags)
    connection.send(bytes(header), payload or None)


@pytest.fixture
def worker_rig(pair_factory):
    """A worker engine with one link over a verbs stream, the server played by the test."""
    t = _t()
    ours, theirs = pair_factory(TIMEOUT, native=True)
    engine = t.Engine(1, 0, 4096, TIMEOUT, 3)
    engine.start_link(0, *ours.engine_stream(), registrations=ours.registrations)
    yield engine, ours, theirs
    engine.fail_link(t.ENGINE_ALL_LINKS, t.OUTCOME_CANCELLED)
    engine.close()
    engine.reap()


def test_a_large_push_leaves_from_the_array_and_says_where_its_result_goes(worker_rig):
    engine, ours, server = worker_rig
    key = engine.add_key(5, 0, protocol.DTYPE_CODES["uint8"], [0, LARGE], [LARGE, 100], [0, 0])
    source = np.arange(LARGE + 100, dtype=np.uint8)
    target = np.zeros(LARGE + 100, np.uint8)
    op = engine.submit(key, source, target, 0, 0)
    seen = {}
    for _ in range(2):
        fields = raw_header(server)
        flags, chunk, length = fields[4], fields[6], fields[9]
        place = struct.unpack("<QI", read_raw(server, 12)) if flags & PLACE_RESULT else None
        seen[chunk] = (flags & ~PLACE_RESULT, place, read_raw(server, length))
    assert seen[0][1] == (target.ctypes.data, ours.registrations.get(target, _t().IBV_ACCESS_LOCAL_WRITE
                                                                      | _t().IBV_ACCESS_REMOTE_WRITE).rkey)
    assert seen[1][1] is None, "a small chunk's result comes through the ring"
    assert seen[0][2] == source[:LARGE].tobytes() and seen[1][2] == source[LARGE:].tobytes()
    assert ours.placed_bytes == LARGE, "the large chunk left from the caller's array, not staging"
    # Answered with bytes instead of a placement: taken as any result.
    for chunk, offset, length in ((0, 0, LARGE), (1, LARGE, 100)):
        send_raw(server, Op.RESULT, bytes(source[offset:offset + length] * 2), key=5, chunk=chunk,
                 dtype=protocol.DTYPE_CODES["uint8"])
    assert op.wait(TIMEOUT) and op.outcome[0] == _t().OUTCOME_OK
    np.testing.assert_array_equal(target, source * 2)


def test_a_result_claimed_placed_where_no_place_was_given_stops_the_link(worker_rig):
    engine, _, server = worker_rig
    key = engine.add_key(6, 0, protocol.DTYPE_CODES["uint8"], [0], [100], [0])
    value = np.ones(100, np.uint8)
    op = engine.submit(key, value, value, 0, 0)
    fields = raw_header(server)
    assert not fields[4] & PLACE_RESULT
    read_raw(server, fields[9])
    header = bytearray(protocol.pack(Op.RESULT, length=100, key=6, dtype=protocol.DTYPE_CODES["uint8"]))
    struct.pack_into("<I", header, 8, PLACED)
    server.send(bytes(header))            # "written into your memory": nothing follows
    link, kind, code, *_ = engine.next_event(TIMEOUT)
    assert (link, kind, code) == (0, _t().EVENT_CLOSED, _t().ERR_SHARED)
    assert not op.done()


def test_a_worker_naming_a_bad_place_loses_only_its_own_link(pair_factory):
    """The server RDMA-writes a result where the push said; a key the worker never
    gave fails that write, and with it that worker's queue pair only."""
    t = _t()
    pairs = [pair_factory(TIMEOUT, native=True) for _ in range(2)]
    engine = t.ServerEngine(2, TIMEOUT, 64 * 1024)
    for rank, (_, server_end) in enumerate(pairs):
        engine.start_link(rank, *server_end.engine_stream())
    try:
        key = engine.add_key(9)
        buffers = (np.zeros(LARGE, np.uint8), np.zeros(LARGE, np.uint8))
        engine.add_chunk(key, 0, protocol.DTYPE_CODES["int32"], *buffers)
        for rank in range(2):
            engine.declared_by(key, rank)
        values = [np.arange(LARGE // 4, dtype=np.int32) * (rank + 1) for rank in range(2)]
        hostile, honest = pairs[0][0], pairs[1][0]
        send_raw(hostile, Op.PUSH, struct.pack("<QI", 0x1000, 0xBAD) + values[0].tobytes(), flags=PLACE_RESULT,
                 length=LARGE, key=9, dtype=protocol.DTYPE_CODES["int32"], sender=0)
        send_raw(honest, Op.PUSH, values[1].tobytes(), key=9, dtype=protocol.DTYPE_CODES["int32"], sender=1)
        fields = raw_header(honest)
        assert fields[2] == Op.RESULT and not fields[4] & PLACED
        result = np.frombuffer(read_raw(honest, fields[9]), np.int32)
        np.testing.assert_array_equal(result, values[0] + values[1])
        event = engine.next_event(TIMEOUT)
        assert event is not None and event[0] == 0 and event[1] in (t.EVENT_CLOSED, t.EVENT_SEND_FAILED)
    finally:
        engine.close()


def test_a_push_naming_a_place_for_a_key_the_engine_does_not_hold_goes_to_the_control_plane(pair_factory):
    """A worker pushes a key right after declaring it, before the server's refusal (or
    acceptance) can reach it: the engine drops the push's place and lets the control plane
    read the push, as it would an unflagged one, instead of stopping the link."""
    t = _t()
    worker_end, server_end = pair_factory(TIMEOUT, native=True)
    engine = t.ServerEngine(1, TIMEOUT, 64 * 1024)
    engine.start_link(0, *server_end.engine_stream())
    try:
        value = np.arange(LARGE, dtype=np.uint8)
        send_raw(worker_end, Op.PUSH, struct.pack("<QI", 0x1000, 0x77) + value.tobytes(), flags=PLACE_RESULT,
                 length=LARGE, key=77, dtype=protocol.DTYPE_CODES["uint8"], sender=0)
        link, kind, _, _, _, fields, payload = engine.next_event(TIMEOUT)
        assert (link, kind, fields[2], fields[5], fields[9], payload) == (0, t.EVENT_MESSAGE, Op.PUSH, 77, LARGE, None)
        data = bytearray(LARGE)
        taken = engine.take_buffered(0, data)
        if taken < LARGE:
            server_end.recv_payload(types.SimpleNamespace(length=LARGE - taken), memoryview(data)[taken:])
        assert bytes(data) == value.tobytes(), "the place was taken off before the push's bytes"
        engine.answer(0, t.VERDICT_CONTINUE)
        send_raw(worker_end, Op.ERROR, b'{"message": "still here"}')
        link, kind, _, _, _, fields, payload = engine.next_event(TIMEOUT)
        assert (kind, fields[2], payload) == (t.EVENT_MESSAGE, Op.ERROR, b'{"message": "still here"}')
    finally:
        engine.close()
