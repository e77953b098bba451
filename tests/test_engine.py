"""The native engines (rdmakv/native/worker_engine.c, server_engine.c) against
peers played by the test over real socket pairs: what goes on the wire, in what
order, what comes back, and what a hostile or failing peer makes of it."""
import ctypes
import ctypes.util
import errno
import gc
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rdmakv.core import protocol
from rdmakv.core.errors import ProtocolError
from rdmakv.core.protocol import FLAG_ACK, FLAG_NO_DATA, Op
from rdmakv.native import transport as _t

from socket_helpers import recv_exactly

TIMEOUT = 10.0


def read_message(sock):
    header = protocol.unpack(recv_exactly(sock, protocol.HEADER_SIZE))
    return header, recv_exactly(sock, header.length)


def reply(sock, op, payload=b"", **fields):
    sock.sendall(protocol.pack(op, length=len(payload), **fields) + payload)


class Rig:
    """An engine with one link whose far end is `server`, a plain socket."""

    def __init__(self, credit=0, small=64 * 1024, links=1):
        self.engine = _t.Engine(links, credit, small, TIMEOUT, 7)
        self.pairs = [socket.socketpair() for _ in range(links)]
        for index, (ours, theirs) in enumerate(self.pairs):
            ours.setblocking(False)
            theirs.settimeout(TIMEOUT)
            self.engine.start_link(index, ours.fileno())
        self.server = self.pairs[0][1]

    def key(self, wire, sizes, dtype=protocol.DTYPE_CODES["uint8"], links=None, order=0):
        offsets = np.cumsum([0] + list(sizes[:-1])).tolist()
        return self.engine.add_key(wire, order, dtype, offsets, list(sizes), links or [0] * len(sizes))

    def close(self):
        self.engine.fail_link(_t.ENGINE_ALL_LINKS, _t.OUTCOME_CANCELLED)
        self.engine.close()
        self.engine.reap()
        for ours, theirs in self.pairs:
            ours.close()
            theirs.close()


@pytest.fixture
def rig(closing):
    return lambda **kwargs: closing(Rig(**kwargs))


def test_a_pushpull_goes_out_from_the_source_and_its_result_lands_in_the_target(rig):
    r = rig()
    key = r.key(0xABC, [5, 3])
    source = np.arange(8, dtype=np.uint8)
    target = np.zeros(8, np.uint8)
    op = r.engine.submit(key, source, target, 3, 0)
    assert op.round == 0
    pushes = [read_message(r.server) for _ in range(2)]
    assert [(h.op, h.key, h.chunk, h.round, h.priority, h.sender, p) for h, p in pushes] == [
        (Op.PUSH, 0xABC, 0, 0, 3, 7, bytes(range(5))), (Op.PUSH, 0xABC, 1, 0, 3, 7, bytes(range(5, 8)))]
    reply(r.server, Op.RESULT, b"\x10" * 5, key=0xABC, chunk=0, round=0)
    assert not op.wait(0.2)                 # one chunk is still owed
    assert op.owed(0) == ([1], 1)
    reply(r.server, Op.RESULT, b"\x20" * 3, key=0xABC, chunk=1, round=0)
    assert op.wait(TIMEOUT)
    assert op.outcome == (_t.OUTCOME_OK, 0)
    assert target.tolist() == [0x10] * 5 + [0x20] * 3
    # The next round of the key is numbered on.
    assert r.engine.submit(key, source, target, 0, 0).round == 1


def test_with_a_spin_budget_the_engine_polls_then_sleeps_and_still_answers(rig):
    r = Rig.__new__(Rig)
    r.engine = _t.Engine(1, 0, 64 * 1024, TIMEOUT, 7)
    r.engine.set_spin(0.002)                 # RDMAKV_SPIN_US=2000
    r.pairs = [socket.socketpair()]
    r.pairs[0][0].setblocking(False)
    r.pairs[0][1].settimeout(TIMEOUT)
    r.engine.start_link(0, r.pairs[0][0].fileno())
    r.server = r.pairs[0][1]
    try:
        key = r.key(3, [8])
        value = np.zeros(8, np.uint8)
        for rnd in range(3):                 # the reader spins, gives up, sleeps, wakes for the next
            op = r.engine.submit(key, value, value, 0, 0)
            read_message(r.server)
            __import__("time").sleep(0.01)
            reply(r.server, Op.RESULT, bytes([rnd + 1]) * 8, key=3, chunk=0, round=rnd)
            assert op.wait(TIMEOUT) and value.tolist() == [rnd + 1] * 8
    finally:
        r.close()


def test_rounds_of_a_key_go_out_in_order_one_at_a_time(rig):
    r = rig()
    key = r.key(1, [4])
    value = np.ones(4, np.uint8)
    ops = [r.engine.submit(key, value, value, 0, 0) for _ in range(3)]
    for rnd in range(3):
        header, _ = read_message(r.server)
        assert (header.round, header.chunk) == (rnd, 0)
        r.server.settimeout(0.2)
        with pytest.raises(socket.timeout):          # the next round waits for this one's result
            r.server.recv(1, socket.MSG_PEEK)
        r.server.settimeout(TIMEOUT)
        reply(r.server, Op.RESULT, bytes(4), key=1, chunk=0, round=rnd)
        assert ops[rnd].wait(TIMEOUT)


def test_credit_holds_large_chunks_back_and_priority_chooses_the_next(rig):
    r = rig(credit=100, small=10)
    low = r.key(1, [100, 100], order=0)
    high = r.key(2, [100], order=1)
    a = np.zeros(200, np.uint8)
    b = np.zeros(100, np.uint8)
    r.engine.submit(low, a, a, 0, 0)
    first, _ = read_message(r.server)
    assert (first.key, first.chunk, first.flags & FLAG_ACK) == (1, 0, FLAG_ACK)
    r.engine.submit(high, b, b, 5, 0)       # queued behind the credit, ahead of low's chunk 1
    r.server.settimeout(0.2)
    with pytest.raises(socket.timeout):
        r.server.recv(1, socket.MSG_PEEK)
    r.server.settimeout(TIMEOUT)
    reply(r.server, Op.RECEIVED, key=1, chunk=0, round=0)
    second, _ = read_message(r.server)
    assert (second.key, second.priority) == (2, 5)
    reply(r.server, Op.RECEIVED, key=2, chunk=0, round=0)
    third, _ = read_message(r.server)
    assert (third.key, third.chunk) == (1, 1)


def test_the_source_stays_exported_until_the_engine_is_done_with_it(rig):
    r = rig(credit=1, small=0)
    key = r.key(5, [1 << 16, 1 << 16])
    op = r.engine.submit(key, np.full(1 << 17, 9, np.uint8), np.zeros(1 << 17, np.uint8), 0, 0)
    gc.collect()                             # the caller let go of both arrays
    for chunk in range(2):
        header, payload = read_message(r.server)
        assert payload == b"\x09" * (1 << 16)
        reply(r.server, Op.RESULT, payload, key=5, chunk=header.chunk, round=0)
    assert op.wait(TIMEOUT)


def test_a_broadcast_contribution_without_data_sends_a_bare_header(rig):
    r = rig()
    key = r.key(6, [8])
    target = np.zeros(8, np.uint8)
    op = r.engine.submit(key, None, target, 0, protocol.FLAG_BROADCAST | FLAG_NO_DATA)
    header, payload = read_message(r.server)
    assert (header.length, payload, header.flags & FLAG_NO_DATA) == (0, b"", FLAG_NO_DATA)
    reply(r.server, Op.RESULT, b"\x05" * 8, key=6, chunk=0, round=0)
    assert op.wait(TIMEOUT) and target.tolist() == [5] * 8


def test_done_callbacks_run_before_wait_returns_and_at_once_when_done(rig):
    r = rig()
    key = r.key(7, [2])
    value = np.zeros(2, np.uint8)
    op = r.engine.submit(key, value, value, 0, 0)
    seen = []
    op.add_done_callback(lambda target: seen.append((target, threading.current_thread().name)), "first")
    read_message(r.server)
    reply(r.server, Op.RESULT, b"\x01\x02", key=7, chunk=0, round=0)
    assert op.wait(TIMEOUT)
    assert seen and seen[0][0] == "first" and seen[0][1] != threading.current_thread().name
    op.add_done_callback(lambda target: seen.append((target, threading.current_thread().name)), "late")
    assert seen[1] == ("late", threading.current_thread().name)


class Semaphore:
    """A POSIX semaphore whose sem_post is a native completion (complete(engine=sem, ...)):
    the engine's thread posts it without Python, and wait() holds the GIL while it waits."""
    _libc = ctypes.PyDLL(ctypes.util.find_library("c"), use_errno=True)   # PyDLL: calls keep the GIL

    def __init__(self):
        self.sem = ctypes.create_string_buffer(64)            # sizeof(sem_t) is 32 on Linux
        assert self._libc.sem_init(self.sem, 0, 0) == 0
        self.post = ctypes.cast(self._libc.sem_post, ctypes.c_void_p).value
        self.address = ctypes.addressof(self.sem)

    def wait_holding_the_gil(self, timeout):
        """True once posted, False after timeout seconds; no other Python thread runs meanwhile."""
        deadline = time.time() + timeout
        spec = (ctypes.c_long * 2)(int(deadline), int(deadline % 1 * 1e9))
        while self._libc.sem_timedwait(self.sem, spec) != 0:
            if ctypes.get_errno() != errno.EINTR:
                return False
        return True

    def value(self):
        count = ctypes.c_int()
        self._libc.sem_getvalue(self.sem, ctypes.byref(count))
        return count.value


def test_a_native_completion_is_called_by_the_engine_thread_without_the_gil(rig):
    r = rig()
    key = r.key(8, [4])
    value = np.zeros(4, np.uint8)
    op = r.engine.submit(key, value, value, 0, 0)
    posted, failures = Semaphore(), []
    op.complete_natively(posted.post, posted.address, 0, failures.append, "handle")
    with pytest.raises(RuntimeError, match="native completion already"):
        op.complete_natively(posted.post, posted.address, 0, failures.append, "handle")
    read_message(r.server)
    reply(r.server, Op.RESULT, b"\x03" * 4, key=8, chunk=0, round=0)
    # This thread keeps the GIL until the engine's reader has finished the op: a
    # completion that needed Python would never come.
    assert posted.wait_holding_the_gil(TIMEOUT), "the native completion did not come while the GIL was held"
    assert op.wait(TIMEOUT) and value.tolist() == [3] * 4
    assert posted.value() == 0 and failures == []              # called once; on_failure never


def test_a_failed_op_calls_on_failure_in_python_instead_of_its_native_completion(rig):
    r = rig()
    key = r.key(9, [4])
    value = np.zeros(4, np.uint8)
    op = r.engine.submit(key, value, value, 0, 0)
    posted, failures, callbacks = Semaphore(), [], []
    op.complete_natively(posted.post, posted.address, 0, lambda target: failures.append(
        (target, op.outcome[0])), "handle")
    op.add_done_callback(callbacks.append, "handle")
    read_message(r.server)
    r.engine.fail_link(0, _t.OUTCOME_LINK_FAILED)
    assert op.wait(TIMEOUT)
    assert failures == [("handle", _t.OUTCOME_LINK_FAILED)] and callbacks == ["handle"]
    assert posted.value() == 0                                 # never called


def test_a_native_completion_registered_after_the_op_finished_is_called_at_once(rig):
    r = rig()
    key = r.key(10, [2])
    value = np.zeros(2, np.uint8)
    done = r.engine.submit(key, value, value, 0, 0)
    read_message(r.server)
    reply(r.server, Op.RESULT, b"\x01\x01", key=10, chunk=0, round=0)
    assert done.wait(TIMEOUT)
    posted, failures = Semaphore(), []
    done.complete_natively(posted.post, posted.address, 0, failures.append, "late")
    assert posted.value() == 1 and failures == []
    failed = r.engine.submit(key, value, value, 0, 0)
    r.engine.fail_key(key)
    assert failed.wait(TIMEOUT)
    failed.complete_natively(posted.post, posted.address, 0, failures.append, "late")
    assert posted.value() == 1 and failures == ["late"]


def test_control_messages_reach_the_control_plane_with_their_payload(rig):
    r = rig()
    reply(r.server, Op.ERROR, protocol.encode_json({"message": "no"}), key=3)
    link, kind, code, _, _, fields, payload = r.engine.next_event(TIMEOUT)
    assert (link, kind, code, fields[2], fields[5]) == (0, _t.EVENT_MESSAGE, 0, Op.ERROR, 3)
    assert protocol.decode_json(payload) == {"message": "no"}
    # Heartbeats are taken in silently; a RECEIVED nothing waits for is ignored.
    reply(r.server, Op.HEARTBEAT)
    reply(r.server, Op.RECEIVED, key=99, chunk=0, round=0)
    assert r.engine.next_event(0.3) is None


@pytest.mark.parametrize("message, error", [
    (lambda: protocol.pack(Op.RESULT, key=0xDEAD, chunk=0, round=0, length=4) + bytes(4), "ERR_UNEXPECTED_RESULT"),
    (lambda: protocol.pack(Op.RESULT, key=1, chunk=0, round=0, length=5) + bytes(5), "ERR_RESULT_LENGTH"),
    (lambda: protocol.pack(Op.ERROR, length=protocol.MAX_CONTROL_BYTES + 1), "ERR_TOO_LARGE"),
    (lambda: protocol.pack(Op.STATES, length=10), "ERR_TOO_LARGE"),           # nobody asked for any
    (lambda: protocol.pack(Op.HEARTBEAT, length=1) + b"x", "ERR_TOO_LARGE"),
    (lambda: b"\x00" * protocol.HEADER_SIZE, "ERR_BAD_MAGIC"),
    (lambda: protocol.pack(Op.RESULT)[:20], "ERR_MIDSTREAM"),
])
def test_a_hostile_server_breaks_only_its_link_and_is_named(rig, message, error):
    r = rig()
    key = r.key(1, [4])
    value = np.zeros(4, np.uint8)
    op = r.engine.submit(key, value, value, 0, 0)
    read_message(r.server)
    data = message()
    r.server.sendall(data)
    if error == "ERR_MIDSTREAM":
        r.server.shutdown(socket.SHUT_WR)
    link, kind, code, _, limit, fields, _ = r.engine.next_event(TIMEOUT)
    assert (link, kind, code) == (0, _t.EVENT_CLOSED, getattr(_t, error))
    if error == "ERR_RESULT_LENGTH":
        assert (limit, fields[9]) == (4, 5)
    assert not op.done()                    # failing the ops is the control plane's decision
    r.engine.fail_link(0, _t.OUTCOME_LINK_FAILED)
    assert op.wait(TIMEOUT) and op.outcome == (_t.OUTCOME_LINK_FAILED, 0)


def test_a_failed_key_fails_its_rounds_and_its_late_results_are_dropped(rig):
    r = rig()
    key = r.key(1, [4])
    other = r.key(2, [4])
    value = np.zeros(4, np.uint8)
    first = r.engine.submit(key, value, value, 0, 0)
    queued = r.engine.submit(key, value, value, 0, 0)
    read_message(r.server)
    r.engine.fail_key(key)
    assert first.wait(TIMEOUT) and queued.wait(TIMEOUT)
    assert first.outcome[0] == queued.outcome[0] == _t.OUTCOME_KEY_FAILED
    reply(r.server, Op.RESULT, bytes(4), key=1, chunk=0, round=0)      # it crossed the failure
    # The link goes on: another key still works.
    op = r.engine.submit(other, value, value, 0, 0)
    header, _ = read_message(r.server)
    reply(r.server, Op.RESULT, b"\x03" * 4, key=2, chunk=0, round=0)
    assert op.wait(TIMEOUT) and op.outcome[0] == _t.OUTCOME_OK and value.tolist() == [3] * 4
    assert r.engine.next_event(0.2) is None
    # A key's later rounds fail at once.
    later = r.engine.submit(key, value, value, 0, 0)
    assert later.wait(TIMEOUT) and later.outcome[0] == _t.OUTCOME_KEY_FAILED


def test_a_dead_server_is_reported_and_closing_cancels_what_waits(rig):
    r = rig(links=2)
    key = r.key(1, [4, 4], links=[0, 1])
    value = np.zeros(8, np.uint8)
    op = r.engine.submit(key, value, value, 0, 0)
    r.pairs[1][1].close()
    link, kind, code, *_ = r.engine.next_event(TIMEOUT)       # its push may go out before the close, or not
    assert link == 1 and (kind, code) in {(_t.EVENT_CLOSED, _t.ERR_EOF), (_t.EVENT_CLOSED, _t.ERR_IO),
                                          (_t.EVENT_SEND_FAILED, _t.ERR_IO)}
    r.engine.fail_link(_t.ENGINE_ALL_LINKS, _t.OUTCOME_CANCELLED)
    assert op.wait(TIMEOUT) and op.outcome[0] == _t.OUTCOME_CANCELLED


def test_a_result_for_a_push_that_has_not_left_is_a_broken_server(rig):
    r = rig(credit=100, small=10)
    key = r.key(1, [100, 100])
    value = np.zeros(200, np.uint8)
    r.engine.submit(key, value, value, 0, 0)
    first, _ = read_message(r.server)            # chunk 1 waits for credit
    assert first.chunk == 0
    reply(r.server, Op.RESULT, bytes(100), key=1, chunk=1, round=0)
    link, kind, code, *_ = r.engine.next_event(TIMEOUT)
    assert (link, kind, code) == (0, _t.EVENT_CLOSED, _t.ERR_UNEXPECTED_RESULT)


def test_after_close_the_engine_sends_nothing_on_the_descriptor(rig):
    r = rig()
    r.engine.close()
    assert r.engine.send(0, protocol.pack(Op.ERROR)) == (_t.ERR_IO, errno.EBADF)


def test_a_forked_child_letting_go_of_the_engine_leaves_the_parents_links(rig):
    r = rig()
    key = r.key(1, [4])
    pid = os.fork()
    if pid == 0:                                 # the child: what exit or `del store` would do
        r.engine.close()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    value = np.zeros(4, np.uint8)
    op = r.engine.submit(key, value, value, 0, 0)
    read_message(r.server)
    reply(r.server, Op.RESULT, b"\x02" * 4, key=1, chunk=0, round=0)
    assert op.wait(TIMEOUT) and op.outcome[0] == _t.OUTCOME_OK and value.tolist() == [2] * 4


def test_a_server_flooding_control_messages_is_held_back_and_then_cut_off():
    engine = _t.Engine(1, 0, 64 * 1024, 1.0, 7)       # RDMAKV_TIMEOUT 1 s
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        engine.start_link(0, ours.fileno())
        flood = protocol.pack(Op.WAITING, length=2) + b"{}"
        theirs.sendall(flood * 1100)           # nobody takes the events meanwhile
        __import__("time").sleep(2.0)
        kinds = []
        while (event := engine.next_event(0.5)) is not None:
            kinds.append((event[1], event[2]))
        # At most the mailbox's 1,024 messages were kept; then the reader waited
        # RDMAKV_TIMEOUT for room and gave the link up.
        assert kinds[:1024] == [(_t.EVENT_MESSAGE, 0)] * 1024
        assert kinds[1024:] == [(_t.EVENT_CLOSED, _t.ERR_TIMEOUT)]
    finally:
        engine.close()
        ours.close()
        theirs.close()


def test_a_failed_op_whose_send_is_stuck_is_settled_before_it_is_done(rig):
    r = rig()
    key = r.key(1, [16 << 20])
    value = np.zeros(16 << 20, np.uint8)
    op = r.engine.submit(key, value, value, 0, 0)     # the server reads nothing: the send blocks
    __import__("time").sleep(0.3)
    r.engine.fail_link(0, _t.OUTCOME_LINK_FAILED)
    # The outcome is known (KVStore's wait() raises it rather than a timeout), but the
    # op is not done while the stuck send still reads its buffer.
    assert op.settled() and op.outcome == (_t.OUTCOME_LINK_FAILED, 0)
    assert not op.done()
    r.server.close()                                  # the send fails; the op finishes
    assert op.wait(TIMEOUT)


def test_a_send_to_a_closed_server_is_reported_once(rig):
    r = rig()
    r.server.close()
    code, err = r.engine.send(0, protocol.pack(Op.ERROR, length=2), b"{}")
    events = []
    while (event := r.engine.next_event(0.5)) is not None:
        events.append(event[1])
    assert code == _t.ERR_IO or events
    assert events.count(_t.EVENT_CLOSED) <= 1


@settings(max_examples=300, deadline=None)
@given(magic=st.sampled_from([protocol.MAGIC, 0, 0x564B4453]), version=st.integers(0, 3),
       op=st.integers(0, 255), dtype=st.integers(0, 255), flags=st.integers(0, 2**32 - 1) | st.integers(0, 8))
def test_the_engine_checks_headers_as_rdmakv_protocol_does(magic, version, op, dtype, flags):
    packed = protocol.HEADER.pack(magic, version, op, dtype, flags, 1, 2, 3, 4, 5, 6)
    try:
        protocol.unpack(packed)
        expected = 0
    except ProtocolError:
        expected = None
    code = _t.header_check(packed)
    assert (code == 0) if expected == 0 else (code != 0)


def test_the_engine_knows_the_wire_constants_of_rdmakv_protocol():
    source = open(os.path.join(os.path.dirname(_t.__file__), "wire.h")).read()

    def defined(name):
        return int(source.split(f"#define {name} ")[1].split()[0].rstrip("u"), 0)

    assert defined("RK_MAGIC") == protocol.MAGIC and defined("RK_VERSION") == protocol.VERSION
    for name in ("PUSH", "RESULT", "STATES", "RECEIVED", "HEARTBEAT"):
        assert defined(f"RK_OP_{name}") == getattr(Op, name)
    assert defined("RK_KNOWN_FLAGS") == protocol.KNOWN_FLAGS
    assert defined("RK_MAX_DTYPE") == max(protocol.DTYPE_CODES.values())
    assert struct.calcsize("<IHBBIQIiQQI") == protocol.HEADER_SIZE == 48


# ---- the server's engine (rdmakv/native/server_engine.c), workers played by the test ----

class ServerRig:
    """A server engine with `workers` links whose far ends are plain sockets."""

    def __init__(self, workers=2, direct=64 * 1024):
        self.engine = _t.ServerEngine(workers, TIMEOUT, direct)
        self.pairs = [socket.socketpair() for _ in range(workers)]
        self.workers = [theirs for _, theirs in self.pairs]
        for rank, (ours, theirs) in enumerate(self.pairs):
            ours.setblocking(False)
            theirs.settimeout(TIMEOUT)
            self.engine.start_link(rank, ours.fileno())
        self.buffers = []

    def chunk(self, wire, nbytes, dtype="int32", index=0, declared_by=None):
        key = self.engine.add_key(wire)
        buffers = (np.zeros(nbytes, np.uint8), np.zeros(nbytes, np.uint8))
        self.buffers.append(buffers)
        chunk = self.engine.add_chunk(key, index, protocol.DTYPE_CODES[dtype], *buffers)
        for rank in range(len(self.workers)) if declared_by is None else declared_by:
            self.engine.declared_by(key, rank)
        return key, chunk

    def push(self, rank, wire, values, round=0, flags=0, index=0, dtype=None):
        payload = b"" if flags & FLAG_NO_DATA else values.tobytes()
        reply(self.workers[rank], Op.PUSH, payload, key=wire, chunk=index, round=round, flags=flags,
              dtype=protocol.DTYPE_CODES[dtype or values.dtype.name], sender=rank)

    def close(self):
        self.engine.close()
        for ours, theirs in self.pairs:
            ours.close()
            theirs.close()


@pytest.fixture
def server_rig(closing):
    return lambda **kwargs: closing(ServerRig(**kwargs))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "uint8", "int32", "int64"])
def test_the_server_engine_sums_every_dtype_exactly_and_answers_every_worker(server_rig, dtype):
    r = server_rig(workers=3)
    rng = np.random.default_rng(1)
    values = [rng.integers(-50, 50, 101).astype(dtype) for _ in range(3)]
    r.chunk(9, values[0].nbytes, dtype)
    for rnd in range(3):                      # alternate round buffers
        for rank in (2, 0, 1):
            r.push(rank, 9, values[rank] + rnd, round=rnd)
        expected = sum((v + rnd).astype(dtype) for v in values).astype(dtype)
        for rank in range(3):
            header, payload = read_message(r.workers[rank])
            assert (header.op, header.key, header.round) == (Op.RESULT, 9, rnd)
            np.testing.assert_array_equal(np.frombuffer(payload, dtype), expected)


def test_a_push_holding_credit_is_acknowledged_before_the_round_completes(server_rig):
    r = server_rig()
    r.chunk(1, 16)
    r.push(0, 1, np.arange(4, dtype=np.int32), flags=FLAG_ACK)
    header, _ = read_message(r.workers[0])
    assert (header.op, header.key, header.round) == (Op.RECEIVED, 1, 0)


@pytest.mark.parametrize("second, code, limit", [
    (dict(round=1), "REFUSE_ROUND", 0),
    (dict(rank=0), "REFUSE_TWICE", None),
    (dict(dtype="float32"), "REFUSE_DTYPE", protocol.DTYPE_CODES["int32"]),
    (dict(flags=protocol.FLAG_BROADCAST), "REFUSE_MIXED", None),
])
def test_a_push_out_of_turn_is_refused_with_its_reason_and_the_link_goes_on(server_rig, second, code, limit):
    r = server_rig()
    r.chunk(1, 16)
    value = np.arange(4, dtype=np.int32)
    r.push(0, 1, value, flags=FLAG_ACK)
    assert read_message(r.workers[0])[0].op == Op.RECEIVED      # in before the second push
    rank = second.pop("rank", 1)
    r.push(rank, 1, value.view(np.float32) if second.get("dtype") else value, **second)
    link, kind, refusal, _, got_limit, fields, _ = r.engine.next_event(TIMEOUT)
    assert (link, kind, refusal) == (rank, _t.EVENT_REFUSED, getattr(_t, code))
    if limit is not None:
        assert got_limit == limit
    # The stream is still in step: the refused push was read whole, and another key is summed.
    r.chunk(2, 4)
    for worker in range(2):
        r.push(worker, 2, np.array([worker + 1], np.int32))
    for worker in range(2):
        header, payload = read_message(r.workers[worker])
        assert (header.op, header.key, np.frombuffer(payload, np.int32).tolist()) == (Op.RESULT, 2, [3])
    assert r.engine.next_event(0.2) is None


def test_pushes_through_the_host_count_as_their_workers_and_are_answered_with_a_header(server_rig):
    # One push per host: workers 1 and 2 added theirs into the host's sum, which their
    # root (worker 0) pushes; the round completes with all three, exactly as before.
    r = server_rig(workers=3)
    for rank in (1, 2):
        r.engine.allow_via_host(rank)
    r.chunk(4, 16)
    for rnd in range(3):                      # both round buffers, and their via-host bits
        host_sum = np.arange(4, dtype=np.int32) * (rnd + 1)
        order = (1, 0, 2) if rnd % 2 else (2, 1, 0)
        for rank in order:
            if rank == 0:
                r.push(0, 4, host_sum, round=rnd)
            else:
                reply(r.workers[rank], Op.PUSH, b"", key=4, round=rnd, flags=protocol.FLAG_VIA_HOST,
                      dtype=protocol.DTYPE_CODES["int32"], sender=rank)
        header, payload = read_message(r.workers[0])
        assert (header.op, header.round, header.flags) == (Op.RESULT, rnd, 0)
        np.testing.assert_array_equal(np.frombuffer(payload, np.int32), host_sum)
        for rank in (1, 2):
            header, payload = read_message(r.workers[rank])
            assert (header.op, header.round, header.flags, payload) == (Op.RESULT, rnd, protocol.FLAG_VIA_HOST, b"")
    assert r.engine.next_event(0.2) is None


def test_a_push_through_the_host_from_a_worker_outside_the_plan_stops_its_link(server_rig):
    r = server_rig()
    r.engine.allow_via_host(0)
    r.chunk(4, 16)
    reply(r.workers[1], Op.PUSH, b"", key=4, flags=protocol.FLAG_VIA_HOST, dtype=protocol.DTYPE_CODES["int32"])
    assert r.engine.next_event(TIMEOUT)[:3] == (1, _t.EVENT_CLOSED, _t.ERR_VIA_HOST)
    # A broadcast part, even from a worker of the plan, is not one that goes through the host.
    reply(r.workers[0], Op.PUSH, b"", key=4, flags=protocol.FLAG_VIA_HOST | protocol.FLAG_BROADCAST,
          dtype=protocol.DTYPE_CODES["int32"])
    assert r.engine.next_event(TIMEOUT)[:3] == (0, _t.EVENT_CLOSED, _t.ERR_VIA_HOST)


def test_a_push_of_a_key_the_worker_never_declared_stops_its_link(server_rig):
    r = server_rig()
    r.chunk(1, 16, declared_by=[1])
    r.push(0, 1, np.arange(4, dtype=np.int32))
    assert r.engine.next_event(TIMEOUT)[:3] == (0, _t.EVENT_REFUSED, _t.REFUSE_UNDECLARED)


def test_a_message_the_engine_cannot_place_is_read_by_the_control_plane_meanwhile(server_rig):
    r = server_rig()
    reply(r.workers[1], Op.DECLARE, b'{"key": 5}')
    reply(r.workers[1], Op.PUSH, bytes(range(8)), key=77, chunk=0, dtype=6)      # an undeclared key
    # A control message comes whole (its payload is bounded), and the link waits for the verdict.
    link, kind, _, _, _, fields, payload = r.engine.next_event(TIMEOUT)
    assert (link, kind, fields[2], payload) == (1, _t.EVENT_MESSAGE, Op.DECLARE, b'{"key": 5}')
    assert r.engine.next_event(0.2) is None
    r.engine.answer(1, _t.VERDICT_CONTINUE)
    # A push it cannot place: the payload is left to the control plane, which reads
    # what the engine read ahead, then the socket.
    link, kind, _, _, _, fields, payload = r.engine.next_event(TIMEOUT)
    assert (kind, fields[2], fields[5], payload) == (_t.EVENT_MESSAGE, Op.PUSH, 77, None)
    data = bytearray(fields[9])
    taken = r.engine.take_buffered(1, data)
    data[taken:] = recv_exactly(r.pairs[1][0], len(data) - taken)
    assert data == bytes(range(8))
    r.engine.answer(1, _t.VERDICT_STOP)
    assert r.engine.next_event(0.3) is None                          # a stop is the control plane's to report


def test_with_an_optimizer_a_summed_round_waits_for_the_control_plane(server_rig):
    r = server_rig()
    _, chunk = r.chunk(4, 8)
    r.engine.set_optimizer(True)
    for rank in range(2):
        r.push(rank, 4, np.array([1, 2], np.int32), round=0)
    link, kind, _, _, _, fields, _ = r.engine.next_event(TIMEOUT)
    assert (kind, fields[5], fields[8]) == (_t.EVENT_SUMMED, 4, 0)
    np.testing.assert_array_equal(r.buffers[0][0].view(np.int32), [2, 4])
    weight = np.array([7, 7], np.int32)
    r.engine.reply_all(chunk, 0, 0, weight.view(np.uint8))
    for worker in r.workers:
        header, payload = read_message(worker)
        assert header.op == Op.RESULT and np.frombuffer(payload, np.int32).tolist() == [7, 7]


def test_rounds_left_open_are_reported_once_with_who_pushed(server_rig):
    r = server_rig(workers=3)
    r.chunk(6, 4)
    r.push(2, 6, np.array([1], np.int32))
    deadline = __import__("time").monotonic() + TIMEOUT
    while not (stale := r.engine.stale_rounds(0.0)):
        assert __import__("time").monotonic() < deadline
    assert stale == [(6, 0, {2: 0})]
    assert r.engine.stale_rounds(0.0) == []
