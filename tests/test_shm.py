"""The shared-memory transport: the transport contract between real processes
(tests/shm_peer.py is the far end), clean-up after exit and after kill -9, the
fall-back to TCP, and the KVStore suites run over shared memory."""
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import rdmakv
from kvstore_helpers import expected_sum, worker_values
from cluster import REPO
from rdmakv.core import protocol
from rdmakv.core.errors import ConfigError, ConnectionClosed, TransportError
from rdmakv.core.protocol import Op
from rdmakv.server import summing
from rdmakv.transport import choose_transport, shm, tcp

pytestmark = pytest.mark.skipif(shm.unavailable() is not None, reason=f"no shared memory: {shm.unavailable()}")

LAYER = shm.over(tcp, forced=True)


def dev_shm():
    return set(os.listdir("/dev/shm"))


def shm_mappings(pid="self"):
    """Mappings and fds of our segments in a process (memfd names show in both)."""
    with open(f"/proc/{pid}/maps") as maps:
        mapped = [line for line in maps if "rdmakv-shm" in line]
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "rdmakv-shm" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                fds.append(fd)
        except OSError:
            pass
    return mapped, fds


class FarEnd:
    """tests/shm_peer.py in its own process, and our connection to it."""
    count = 0

    def __init__(self, tmp_path, mode="echo"):
        FarEnd.count += 1
        port_file = str(tmp_path / f"port-{mode}-{FarEnd.count}")
        self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "shm_peer.py"), mode, port_file],
                                     env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.exists(port_file):
            assert self.proc.poll() is None and time.monotonic() < deadline, "the far end did not start"
            time.sleep(0.02)
        port, self.pid = map(int, open(port_file).read().split())
        self.connection = LAYER.connect("127.0.0.1", port, 10)
        self.port = port

    def close(self):
        self.connection.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def far_end(tmp_path):
    made = []

    def make(mode="echo"):
        end = FarEnd(tmp_path, mode)
        made.append(end)
        return end

    yield make
    for end in made:
        end.close()


def frame(n, seed):
    payload = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    return protocol.pack(Op.PUSH, key=seed, chunk=7, round=seed, length=n), payload


def roundtrip(connection, n, seed):
    header, payload = frame(n, seed)
    connection.send(header, payload if n else None)
    got = connection.recv_header(10)
    assert (got.key, got.chunk, got.round, got.length) == (seed, 7, seed, n)
    back = np.empty(n, np.uint8)
    if n:
        connection.recv_payload(got, back)
    np.testing.assert_array_equal(back, payload)


def test_frames_of_every_size_cross_to_another_process_and_back(far_end):
    end = far_end()
    assert type(end.connection).__name__ == "ShmConnection"
    assert end.connection.peer == f"127.0.0.1:{end.port} (shm)"
    assert end.proc.stdout.readline().decode().startswith(f"ShmConnection local pid {os.getpid()} (shm)")
    # Empty, tiny, around the GIL-held threshold, bigger than a ring piece, bigger than the ring (16 MiB).
    for seed, n in enumerate([0, 1, 47, 48, 65536 - 48, 65536, 65537, 300_000, 5 << 20, 40 << 20]):
        roundtrip(end.connection, n, seed)


def test_many_messages_both_ways_at_once(far_end):
    end = far_end()
    connection = end.connection
    sizes = [(i * 7919) % 200_000 for i in range(400)]
    errors = []

    def sender():
        try:
            for seed, n in enumerate(sizes):
                header, payload = frame(n, seed)
                connection.send(header, payload if n else None)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender)]
    threads[0].start()
    for seed, n in enumerate(sizes):            # the echoes come back while we still send
        got = connection.recv_header(10)
        assert (got.key, got.length) == (seed, n)
        back = np.empty(n, np.uint8)
        if n:
            connection.recv_payload(got, back)
        np.testing.assert_array_equal(back, frame(n, seed)[1])
    threads[0].join(10)
    assert not errors


def test_close_wakes_a_blocked_receiver_and_a_blocked_sender(far_end):
    end = far_end("mute")                        # never reads: our sends fill the ring, then block
    connection = end.connection
    outcome = {}

    def receive():
        try:
            outcome["recv"] = connection.recv_header(30)
        except ConnectionClosed as exc:
            outcome["recv"] = exc

    def send():
        header, payload = frame(40 << 20, 1)      # more than the 16 MiB ring
        try:
            connection.send(header, payload)
            outcome["send"] = "returned"
        except ConnectionClosed as exc:
            outcome["send"] = exc

    threads = [threading.Thread(target=receive), threading.Thread(target=send)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    connection.close()
    for thread in threads:
        thread.join(5)
    assert time.monotonic() - started < 1.0
    assert isinstance(outcome["recv"], ConnectionClosed) and "(shm)" in str(outcome["recv"])
    assert isinstance(outcome["send"], ConnectionClosed)
    connection.close()                            # idempotent
    assert shm_mappings() == ([], [])


@pytest.mark.parametrize("blocked_in", ["recv", "send"])
def test_killed_peer_ends_blocked_calls_naming_it_and_nothing_lingers(far_end, blocked_in):
    before = dev_shm()
    end = far_end("mute" if blocked_in == "send" else "echo")
    connection = end.connection
    assert shm_mappings(end.pid)[0], "the far end maps the segment"
    assert shm_mappings(end.pid)[1] == [], "the far end keeps no fd to it"
    outcome = {}

    def blocked():
        try:
            if blocked_in == "send":
                connection.send(*frame(40 << 20, 1))
            else:
                connection.recv_header(30)
            outcome["result"] = "returned"
        except ConnectionClosed as exc:
            outcome["result"] = exc

    thread = threading.Thread(target=blocked)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    os.kill(end.pid, signal.SIGKILL)
    thread.join(5)
    assert time.monotonic() - started < 2.0
    error = outcome["result"]
    assert isinstance(error, ConnectionClosed), error
    assert f"127.0.0.1:{end.port} (shm)" in str(error)
    end.proc.wait(10)
    connection.close()
    assert shm_mappings() == ([], [])
    assert dev_shm() == before


def test_segments_leave_no_trace_after_a_clean_exit(far_end):
    before = dev_shm()
    ends = [far_end() for _ in range(3)]
    for i, end in enumerate(ends):
        roundtrip(end.connection, 1 << 20, i)
    assert len(shm_mappings()[0]) == 3 and shm_mappings()[1] == []
    for end in ends:
        end.connection.close()
        assert end.proc.wait(10) == 0
    assert shm_mappings() == ([], [])
    assert dev_shm() == before


def test_peers_that_cannot_share_memory_use_tcp():
    # A plain TCP listener (the scheduler's kind) and a shm listener reached by a plain TCP connector.
    plain = tcp.Listener("127.0.0.1", 0, 5)
    offered = LAYER.Listener("127.0.0.1", 0, 5)
    try:
        for connect, listener, kind in [(LAYER.connect, plain, "TcpConnection"),
                                        (tcp.connect, offered, "TcpConnection"),
                                        (LAYER.connect, offered, "ShmConnection")]:
            accepted = {}
            thread = threading.Thread(target=lambda: accepted.setdefault("c", listener.accept(5)))
            thread.start()
            mine = connect("127.0.0.1", listener.address[1], 5)
            thread.join(10)
            theirs = accepted["c"]
            assert (type(mine).__name__, type(theirs).__name__) == (kind, kind)
            mine.send(protocol.pack(Op.PING if hasattr(Op, "PING") else Op.BARRIER, length=3), b"abc")
            header = theirs.recv_header(5)
            payload = bytearray(3)
            theirs.recv_payload(header, payload)
            assert payload == b"abc"
            mine.close()
            theirs.close()
    finally:
        plain.close()
        offered.close()


def test_a_local_stranger_at_the_shm_socket_is_refused_and_the_listener_keeps_serving():
    listener = LAYER.Listener("127.0.0.1", 0, 5)
    try:
        name = shm.listener._endpoint(*listener.address)
        for garbage in [b"", b"hello\n", b'{"rdmakv_shm": 1, "ring_bytes": 65536}']:   # no fd passed
            stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stranger.connect(name)
            stranger.sendall(garbage)
            stranger.shutdown(socket.SHUT_WR)
            assert listener.accept(2) is None
            stranger.close()
        # An unsealed segment (whose owner could shrink it under our mapping) is refused too.
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stranger.connect(name)
        fd = os.memfd_create("rdmakv-shm-unsealed")
        os.ftruncate(fd, rdmakv.native.transport.shm_segment_bytes(65536))
        socket.send_fds(stranger, [b'{"rdmakv_shm": 1, "ring_bytes": 65536}'], [fd])
        os.close(fd)
        assert listener.accept(2) is None
        assert b"sealed" in stranger.recv(4096)
        stranger.close()
        accepted = {}
        thread = threading.Thread(target=lambda: accepted.setdefault("c", listener.accept(5)))
        thread.start()
        good = LAYER.connect("127.0.0.1", listener.address[1], 5)
        thread.join(10)
        assert type(good).__name__ == "ShmConnection"
        good.close()
        accepted["c"].close()
    finally:
        listener.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_a_squatter_of_another_user_never_gets_our_memory():
    plain = tcp.Listener("127.0.0.1", 0, 5)
    name = shm.listener._endpoint(*plain.address)
    ready, done = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:                                 # binds the name as nobody, then waits
        try:
            os.setgid(65534)
            os.setuid(65534)
            squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            squatter.bind(name)
            squatter.listen(8)
            os.write(ready[1], b"x")
            os.read(done[0], 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready[0], 1) == b"x"
        with pytest.raises(TransportError, match="runs as uid 65534"):
            LAYER.connect("127.0.0.1", plain.address[1], 5)
        accepted = {}
        thread = threading.Thread(target=lambda: accepted.setdefault("c", plain.accept(5)))
        thread.start()
        fallback = shm.over(tcp).connect("127.0.0.1", plain.address[1], 5)     # auto: TCP instead
        thread.join(10)
        assert type(fallback).__name__ == "TcpConnection"
        fallback.close()
        accepted["c"].close()
    finally:
        os.write(done[1], b"x")
        os.waitpid(pid, 0)
        plain.close()


def test_selection(monkeypatch):
    monkeypatch.delenv("RDMAKV_SHM", raising=False)
    monkeypatch.delenv("RDMAKV_SHM_RING_BYTES", raising=False)
    module, why = choose_transport("auto")
    assert isinstance(module, shm.Layer) and not module.forced and "shared memory" in why
    module, why = choose_transport("shm")
    assert isinstance(module, shm.Layer) and module.forced
    assert choose_transport("tcp")[0] is tcp
    monkeypatch.setenv("RDMAKV_SHM", "0")
    module, why = choose_transport("auto")
    assert module is tcp and "RDMAKV_SHM=0" in why
    with pytest.raises(ConfigError, match="contradicts"):
        choose_transport("shm")
    monkeypatch.setenv("RDMAKV_SHM", "1")
    monkeypatch.setenv("RDMAKV_SHM_RING_BYTES", "1000")
    with pytest.raises(ConfigError, match="power of two"):
        choose_transport("auto")
    from rdmakv.core.config import Config
    assert Config.load(environ={"RDMAKV_TRANSPORT": "shm"}).transport == "shm"


def test_small_ring_streams_large_payloads(far_end, monkeypatch):
    monkeypatch.setenv("RDMAKV_SHM_RING_BYTES", str(64 * 1024))   # the connector chooses the size
    end = far_end()
    for seed, n in enumerate([0, 65536, 65536 * 3 + 5, 3 << 20]):
        roundtrip(end.connection, n, seed)


def test_forced_shm_fails_loudly_when_the_listener_refuses(monkeypatch):
    listener = LAYER.Listener("127.0.0.1", 0, 5)
    try:
        thread = threading.Thread(target=listener.accept, args=(3,))
        thread.start()
        import fcntl

        class Unsealing:                    # a connector that forgets to seal its segment
            def __getattr__(self, name):
                return getattr(fcntl, name)

            def fcntl(self, fd, op, arg=0):
                return 0 if op == fcntl.F_ADD_SEALS else fcntl.fcntl(fd, op, arg)
        monkeypatch.setattr(shm.listener, "fcntl", Unsealing())
        with pytest.raises(TransportError, match=f"127.0.0.1:{listener.address[1]}.*refused shared memory.*sealed"):
            LAYER.connect("127.0.0.1", listener.address[1], 5)
        thread.join(10)
    finally:
        listener.close()


# ---- the KVStore over shared memory ------------------------------------------

@pytest.fixture
def shm_cluster_factory(cluster_factory, monkeypatch):
    """LocalClusters whose servers and workers force shared memory (even where
    the suite runs with RDMAKV_SHM=0); records the connection kinds every worker
    got to its servers."""
    monkeypatch.delenv("RDMAKV_SHM", raising=False)
    kinds = []

    def make(num_workers=2, num_servers=1, **env):
        cluster = cluster_factory(num_workers, num_servers, RDMAKV_TRANSPORT="shm", **env)
        connect = cluster.connect

        def connect_and_record():
            stores = connect()
            kinds.extend(type(link.connection).__name__ for kv in stores for link in kv._links)
            return stores
        cluster.connect = connect_and_record
        return cluster

    yield make
    assert kinds and set(kinds) == {"ShmConnection"}, kinds


def test_kvstore_large_multi_chunk_tensors_and_auth_over_shm(shm_cluster_factory, monkeypatch):
    before = dev_shm()
    monkeypatch.setenv("RDMAKV_SHM_RING_BYTES", str(1 << 20))     # the connecting workers choose it
    cluster = shm_cluster_factory(2, 2, RDMAKV_SECRET="s3cret")

    def work(kv):
        for round_ in range(3):
            value = np.full(9_000_000, kv.rank + round_, np.float32)   # 36 MB: 9 chunks, rings of 1 MiB
            kv.pushpull("big", value)
            assert (value == 2 * round_ + 1).all()
        return True

    assert cluster.run(work, timeout=120) == [True, True]
    cluster.close()
    assert cluster.wait() == [0, 0, 0]
    assert shm_mappings() == ([], [])
    assert dev_shm() == before


def shm_pair(timeout=5):
    """(listener, its side, the connector's side) of one shared-memory connection in this process."""
    listener = LAYER.Listener("127.0.0.1", 0, timeout)
    accepted = {}
    thread = threading.Thread(target=lambda: accepted.setdefault("c", listener.accept(5)))
    thread.start()
    mine = LAYER.connect("127.0.0.1", listener.address[1], timeout)
    thread.join(10)
    return listener, accepted["c"], mine


def result_mappings():
    with open("/proc/self/maps") as maps:
        return [line.split()[1] for line in maps if "rdmakv-shm-results" in line]


def test_a_buffer_from_the_shared_arena_is_read_in_place_by_the_peer():
    listener, theirs, mine = shm_pair()
    try:
        shared = [listener.allocate(n) for n in (1 << 20, 3 << 20, 100_000)]
        small = listener.allocate(1000)                  # below the threshold: an ordinary array
        assert result_mappings() == ["rw-s"] and small.base is None
        rng = np.random.default_rng(5)
        for seed, payload in enumerate(shared + [small, rng.integers(0, 256, 200_000, dtype=np.uint8)]):
            payload[:] = rng.integers(0, 256, payload.nbytes, dtype=np.uint8)
            theirs.send(protocol.pack(Op.RESULT, key=seed, flags=protocol.FLAG_ACK, length=payload.nbytes), payload)
            header = mine.recv_header(5)
            assert (header.key, header.flags, header.length) == (seed, protocol.FLAG_ACK, payload.nbytes)
            back = np.empty(payload.nbytes, np.uint8)
            mine.recv_payload(header, back)
            np.testing.assert_array_equal(back, payload)
        # One segment, passed once, mapped on the receiving side too (writable: shared sums);
        # gone there once it closes.
        assert result_mappings() == ["rw-s", "rw-s"]
        mine.close()
        assert result_mappings() == ["rw-s"]
    finally:
        mine.close()
        theirs.close()
        listener.close()


def offered_sum_pair(timeout=5):
    """shm_pair whose listener side offered its peer the sum of key 5 chunk 0 (1 MiB)."""
    listener, theirs, mine = shm_pair(timeout)
    buffers = [listener.allocate(1 << 20) for _ in range(2)]
    theirs.expose(PUSH_5.stream, buffers)
    theirs.send(protocol.pack(Op.ACK))
    assert mine.recv_header(5).op == Op.ACK        # the offer was taken in on the way
    return listener, theirs, mine, buffers


PUSH_5 = protocol.tag(Op.PUSH, 5, 0, 0)


def sum_in(listener, buffer, source, dtype, round_):
    """The server's contribution to a shared sum (as server.py makes it)."""
    summing.contribute(listener.region(buffer), source, protocol.DTYPE_CODES[dtype], round_, listener._timeout)


def push_in_place(mine, round_, dtype, payload, key=5, flags=protocol.FLAG_ACK):
    """A co-located worker's push: into the offered sum if it may, else as bytes (as server_link.py sends it)."""
    added = summing.push_in_place(mine, protocol.tag(Op.PUSH, key, 0, round_), protocol.DTYPE_CODES[dtype], flags,
                                  payload, mine._timeout)
    mine.send(push_header(round_, dtype, key, flags), None if added else payload, bool(added))
    return added


def push_header(round_, dtype, key=5, flags=protocol.FLAG_ACK):
    return protocol.pack(Op.PUSH, key=key, round=round_, dtype=protocol.DTYPE_CODES[dtype], flags=flags,
                         length=1 << 20)


def test_a_push_is_added_into_the_offered_sum_and_the_first_contribution_of_a_round_copies():
    listener, theirs, mine, buffers = offered_sum_pair()
    rng = np.random.default_rng(3)
    try:
        assert mine.peer_regions(PUSH_5.stream) is not None and theirs.peer_regions(PUSH_5.stream) is None
        summed = 0
        for rnd, dtype in enumerate(["int32", "float64", "int8", "float16", "int64", "uint8", "float32"]):
            ours, other = (rng.integers(-50, 50, (1 << 20) // np.dtype(dtype).itemsize).astype(dtype)
                           for _ in range(2))
            if rnd % 2:                                # whoever comes first copies, the other adds
                summed += push_in_place(mine, rnd, dtype, ours)
                sum_in(listener, buffers[rnd % 2], other, dtype, rnd)
            else:
                sum_in(listener, buffers[rnd % 2], other, dtype, rnd)
                summed += push_in_place(mine, rnd, dtype, ours)
            header = theirs.recv_header(5)
            assert (header.op, header.round, header.length) == (Op.PUSH, rnd, 1 << 20)
            assert header.flags == protocol.FLAG_ACK | protocol.FLAG_IN_PLACE
            np.testing.assert_array_equal(buffers[rnd % 2].view(dtype), ours + other)
        assert summed == 7 << 20
        # Anything else crosses the ring as before: another key, a broadcast.
        for key, round_, flags in ((6, 0, protocol.FLAG_ACK), (5, 7, protocol.FLAG_BROADCAST)):
            payload = rng.integers(0, 100, 1 << 20).astype(np.int8)
            assert not push_in_place(mine, round_, "int8", payload, key=key, flags=flags)
            got = theirs.recv_header(5)
            assert not got.flags & protocol.FLAG_IN_PLACE
            back = np.empty(1 << 20, np.int8)
            theirs.recv_payload(got, back)
            np.testing.assert_array_equal(back, payload)
        # A send in place needs the peer's region for the message's stream, of its size.
        with pytest.raises(ValueError, match="without a region"):
            mine.send(push_header(0, "int8", key=6), None, True)
    finally:
        mine.close()
        theirs.close()
        listener.close()


def test_a_sum_left_locked_times_out_naming_it_and_a_local_close_ends_the_wait():
    listener, theirs, mine, buffers = offered_sum_pair(timeout=1)
    try:
        segment, offset = listener._arena.find(buffers[0])
        np.frombuffer(segment.memory, np.uint32, 1, offset - shm.arena.SUM_CONTROL_BYTES)[0] = 1  # held by a dead process
        began = time.monotonic()
        with pytest.raises(TimeoutError, match="sum"):
            sum_in(listener, buffers[0], np.zeros(1 << 18, np.int32), "int32", 0)
        with pytest.raises(rdmakv.core.errors.PeerTimeout, match="shared sum"):
            push_in_place(mine, 0, "int32", np.zeros(1 << 18, np.int32))
        assert time.monotonic() - began < 5
    finally:
        mine.close()
        theirs.close()
        listener.close()
    listener, theirs, mine, buffers = offered_sum_pair(timeout=60)
    try:
        segment, offset = listener._arena.find(buffers[0])
        np.frombuffer(segment.memory, np.uint32, 1, offset - shm.arena.SUM_CONTROL_BYTES)[0] = 1
        outcome = {}

        def push():
            try:
                push_in_place(mine, 0, "int32", np.zeros(1 << 18, np.int32))
            except rdmakv.core.errors.RdmaKVError as exc:
                outcome["error"] = exc
        pusher = threading.Thread(target=push)
        pusher.start()
        time.sleep(0.3)
        closed_at = time.monotonic()
        mine.close()
        pusher.join(10)
        assert isinstance(outcome.get("error"), rdmakv.core.errors.ConnectionClosed)
        assert time.monotonic() - closed_at < 2
    finally:
        mine.close()
        theirs.close()
        listener.close()


@pytest.mark.parametrize("case", ["summed without an offer", "offer outside its segment", "offer to the server"])
def test_hostile_shared_sum_frames_are_refused(case):
    listener, theirs, mine, buffers = offered_sum_pair(timeout=1)
    try:
        if case == "summed without an offer":
            mine._channel.send_frame(shm.connection._flagged(push_header(0, "int8", key=9), shm.connection.IN_PLACE), None, 1.0)
            receiver, match = theirs, "without a region exposed for it"
        elif case == "offer outside its segment":
            segment, offset = listener._arena.find(buffers[1])
            places = shm.connection.EXPOSED.pack(segment.number, offset, segment.number, segment.size - 4096, 1 << 20)
            theirs._channel.send_frame(shm.connection._flagged(protocol.pack(Op.PUSH, key=8, length=len(places)),
                                                    shm.connection.EXPOSE), places, 1.0)
            receiver, match = mine, "does not fit"
        else:
            places = shm.connection.EXPOSED.pack(0, 4096, 0, 8192, 1 << 20)
            mine._channel.send_frame(shm.connection._flagged(protocol.pack(Op.PUSH, key=8, length=len(places)),
                                                  shm.connection.EXPOSE), places, 1.0)
            receiver, match = theirs, "malformed shared-sum offer"
        with pytest.raises(rdmakv.core.errors.ProtocolError, match=match):
            receiver.recv_header(5)
    finally:
        mine.close()
        theirs.close()
        listener.close()


@pytest.mark.parametrize("case", ["never sent", "outside", "not sealed", "empty"])
def test_a_shared_payload_at_a_bad_place_is_refused(case):
    listener, theirs, mine = shm_pair(timeout=1)
    try:
        length = 1 << 20
        if case == "outside":
            segment = listener._arena._new_segment(0, 1 << 20)
            theirs._share(segment)
            os.close(segment.fd)
            place = shm.connection.PLACE.pack(0, 4096)                  # 4 KiB short of a whole payload
        elif case == "not sealed":
            fd = os.memfd_create("rdmakv-shm-results-unsealed")
            os.ftruncate(fd, 1 << 20)
            socket.send_fds(theirs._sock, [shm.arena.SEGMENT.pack(0, 1 << 20)], [fd])
            os.close(fd)
            place = shm.connection.PLACE.pack(0, 0)
        else:
            place = shm.connection.PLACE.pack(7, 0)
        if case == "empty":
            length = 0
        theirs._channel.send_frame(shm.connection._flagged(protocol.pack(Op.RESULT, length=length), shm.connection.SHARED_PAYLOAD),
                                   place, 1.0)
        with pytest.raises(rdmakv.core.errors.ProtocolError, match={"never sent": "never sent", "outside": "outside",
                                                                "not sealed": "not sealed", "empty": "0 bytes"}[case]):
            header = mine.recv_header(5)
            mine.recv_payload(header, np.empty(length, np.uint8))
    finally:
        mine.close()
        theirs.close()
        listener.close()


def test_kvstore_workers_add_into_the_servers_shared_sums_and_read_results_in_place(shm_cluster_factory):
    # 256 KiB chunks (so workers add their pushes into the servers' shared sums
    # and read results from the servers' memory), odd element counts, a 64 KiB
    # ring (so fallback pushes stream through it), rounds in flight together,
    # and a broadcast then a sum on the same key.
    cluster = shm_cluster_factory(3, 2, RDMAKV_PARTITION_BYTES=256 * 1024, RDMAKV_SHM_RING_BYTES=65536)
    shapes = {"float16": (300_001,), "float32": (120_003,), "float64": (50, 2001), "int8": (700_001,),
              "int32": (99_999,), "int64": (70_001,)}

    def work(kv):
        for dtype, shape in shapes.items():
            for round_ in range(3):
                value = worker_values(kv.rank, shape, dtype, round_)
                np.testing.assert_array_equal(kv.pushpull(dtype, value), expected_sum(3, shape, dtype, round_))
        values = [worker_values(kv.rank, (400_000,), "float32", r) for r in range(4)]
        outs = [np.empty_like(v) for v in values]
        handles = [kv.pushpull_async("burst", v, out=o, priority=r) for r, (v, o) in enumerate(zip(values, outs))]
        for r, handle in enumerate(handles):
            np.testing.assert_array_equal(handle.wait(), expected_sum(3, (400_000,), "float32", r))
        root_value = np.arange(300_000, dtype=np.float32) * (kv.rank + 1)
        kv.broadcast("mixed", root_value, root=1)
        np.testing.assert_array_equal(root_value, np.arange(300_000, dtype=np.float32) * 2)
        value = worker_values(kv.rank, (300_000,), "float32")
        np.testing.assert_array_equal(kv.pushpull("mixed", value), expected_sum(3, (300_000,), "float32"))
        # Rounds after the first find the servers' offers in place (the first may overtake them).
        later_rounds = sum(2 * np.dtype(dtype).itemsize * math.prod(shape) for dtype, shape in shapes.items())
        return sum(link.summed_bytes for link in kv._links) >= later_rounds // 2

    assert cluster.run(work, timeout=120) == [True] * 3


def test_the_server_refuses_a_broadcast_written_into_its_shared_sum(shm_cluster_factory, monkeypatch):
    # The shm layer lets a message of an exposed stream arrive in place; whether that
    # push may be summed in place (a whole plain pushpull, not a broadcast) is the server's
    # rule (rdmakv/server/summing.py), checked by the server on the Python data path.
    from rdmakv.worker.keys import wire_key
    monkeypatch.setenv("RDMAKV_ENGINE", "python")        # the workers' and the server's
    cluster = shm_cluster_factory(2, 1, RDMAKV_PARTITION_BYTES=1 << 20, RDMAKV_TIMEOUT=20)
    shape = ((1 << 20) // 4,)

    def work(kv):
        for round_ in range(2):      # the second round finds the server's sum exposed
            value = worker_values(kv.rank, shape, "int32", round_)
            np.testing.assert_array_equal(kv.pushpull("k", value), expected_sum(2, shape, "int32", round_))
        return kv._links[0].summed_bytes

    assert all(summed >= 1 << 20 for summed in cluster.run(work, timeout=60))
    link = cluster.stores[0]._links[0]
    assert type(link).__name__ == "ServerLink"           # the Python data path
    link.connection.send(protocol.pack(Op.PUSH, dtype=protocol.DTYPE_CODES["int32"], flags=protocol.FLAG_BROADCAST,
                                       key=wire_key("k"), round=2, length=1 << 20), None, True)
    deadline = time.monotonic() + 10
    while link.error is None:
        assert time.monotonic() < deadline, "the server took a broadcast summed in place"
        time.sleep(0.05)


def test_shared_sums_with_a_tcp_worker_and_co_located_workers_on_one_server(cluster_factory, monkeypatch):
    # The server shares its sums with workers 1 and 2 over shared memory; worker 0 reaches
    # it over TCP, so the server adds that worker's pushes under the same lock, in
    # whatever order they meet the others'.
    from cluster import run_threads
    monkeypatch.delenv("RDMAKV_SHM", raising=False)
    cluster = cluster_factory(3, 1, RDMAKV_TRANSPORT="auto", RDMAKV_PARTITION_BYTES=1 << 20)
    stores, errors = run_threads([lambda i=i: rdmakv.KVStore(worker_id=i, **cluster.settings(
        transport="tcp" if i == 0 else "shm")) for i in range(3)], timeout=60)
    cluster.stores.extend(store for store in stores if store is not None)
    assert not any(errors), errors
    shape = (3 << 20) // 8 + 7          # int64: three full chunks and a small one

    def work(kv):
        for round_ in range(6):
            value = worker_values(kv.rank, (shape,), "int64", round_)
            np.testing.assert_array_equal(kv.pushpull("mixed", value), expected_sum(3, (shape,), "int64", round_))
        return type(kv._links[0].connection).__name__, kv._links[0].summed_bytes

    kinds = cluster.run(work, timeout=120)
    assert [kind for kind, _ in kinds] == ["TcpConnection", "ShmConnection", "ShmConnection"]
    assert all(summed >= 5 * (3 << 20) for _, summed in kinds[1:])   # rounds 1-5 of the three full chunks
