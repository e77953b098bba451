"""The transport contract over real verbs (soft-RoCE rxe0 in the test VM):
the same behaviour tcp.py gives, plus zero copy and verbs failure handling."""
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import rdmakv
from rdmakv.core import protocol
from rdmakv.core.errors import (ConnectionClosed, DeviceUnavailable, EndOfStream, PeerTimeout, ProtocolError,
                                TransportError, WorkCompletionError)
from rdmakv.core.protocol import Op
from rdmakv.transport import choose_transport
from rdmakv.transport.verbs import devices as verbs_devices

USABLE, REASON = verbs_devices.probe()
pytestmark = [pytest.mark.rdma, pytest.mark.skipif(not USABLE, reason=f"no usable RDMA device: {REASON}")]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 20.0


@pytest.fixture
def verbs():
    from rdmakv.transport import verbs
    return verbs


@pytest.fixture
def pair(pair_factory):
    return pair_factory()


def header(n, key=0, round_=0):
    return protocol.pack(Op.PUSH, length=n, key=key, round=round_)


def receive(conn, dest=None):
    h = conn.recv_header(TIMEOUT)
    assert h is not None, "no message"
    if dest is None:
        dest = np.empty(h.length, np.uint8)
    if h.length:
        conn.recv_payload(h, dest)
    return h, dest


SIZES = [0, 1, 100, 4096, None, 16384, 100_000, 1 << 20, (4 << 20) + 3]


@pytest.mark.parametrize("size", SIZES)
def test_send_receive_small_large_empty(pair, verbs, size):
    client, server = pair
    size = verbs.EAGER_LIMIT if size is None else size
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    for a, b in ((client, server), (server, client)):
        done = threading.Thread(target=a.send, args=(header(size, key=7), data if size else None))
        done.start()
        h, got = receive(b)
        done.join(TIMEOUT)
        assert (h.op, h.key, h.length) == (Op.PUSH, 7, size)
        np.testing.assert_array_equal(got, data)


def test_empty_payload_buffer_and_none(pair):
    client, server = pair
    client.send(header(0), None)
    client.send(header(0), b"")
    assert receive(server)[0].length == 0
    assert receive(server)[0].length == 0


def test_destination_buffers_views_and_offsets(pair, verbs):
    """Payloads land straight in the caller's destination, also in unaligned views."""
    client, server = pair
    big = np.zeros(3 << 20, np.uint8)
    for n, offset in ((1000, 3), (verbs.EAGER_LIMIT + 1, 4097), (2 << 20, 11)):
        data = np.arange(n, dtype=np.uint64).astype(np.uint8)
        t = threading.Thread(target=client.send, args=(header(n), data))
        t.start()
        h = server.recv_header(TIMEOUT)
        server.recv_payload(h, big[offset:offset + n])
        t.join(TIMEOUT)
        np.testing.assert_array_equal(big[offset:offset + n], data)
        assert not big[:offset].any()
        big[:] = 0
    # A float array as the destination, a bytearray as the source.
    src = bytearray(np.linspace(0, 1, 50_000, dtype=np.float32).tobytes())
    t = threading.Thread(target=client.send, args=(header(len(src)), src))
    t.start()
    out = np.empty(50_000, np.float32)
    server.recv_payload(server.recv_header(TIMEOUT), out)
    t.join(TIMEOUT)
    np.testing.assert_array_equal(out, np.linspace(0, 1, 50_000, dtype=np.float32))


def test_many_messages_in_flight_both_directions(pair, verbs):
    """Several threads send on each side at once (eager and rendezvous mixed,
    more messages than receive slots); each side reads everything, in each
    sender's order, intact."""
    client, server = pair
    senders, per_sender = 4, 60
    sizes = [0, 10, 3000, verbs.EAGER_LIMIT, verbs.EAGER_LIMIT + 1, 70_000, 300_000]
    errors = []

    def payload(key, seq):
        n = sizes[(key * 7 + seq) % len(sizes)]
        return (np.arange(n, dtype=np.uint32) * (key + 1) + seq).astype(np.uint8)

    def send_all(conn, key):
        try:
            for seq in range(per_sender):
                data = payload(key, seq)
                conn.send(header(data.nbytes, key=key, round_=seq), data if data.nbytes else None)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def read_all(conn, result):
        try:
            seen = {}
            for _ in range(senders * per_sender):
                h, got = receive(conn)
                assert h.round == seen.get(h.key, -1) + 1, "messages of one sender out of order"
                seen[h.key] = h.round
                np.testing.assert_array_equal(got, payload(h.key, h.round))
            result.append(seen)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    results = []
    threads = [threading.Thread(target=send_all, args=(conn, k)) for conn in (client, server) for k in range(senders)]
    threads += [threading.Thread(target=read_all, args=(conn, results)) for conn in (client, server)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert len(results) == 2
    for seen in results:
        assert seen == {k: per_sender - 1 for k in range(senders)}


def test_large_payloads_are_zero_copy(pair, verbs):
    client, server = pair
    n = 16 << 20
    data = np.ones(n, np.uint8)
    t = threading.Thread(target=client.send, args=(header(n), data))
    t.start()
    receive(server)
    t.join(TIMEOUT)
    small = np.ones(100, np.uint8)
    client.send(header(100), small)
    receive(server)
    assert client.copied_bytes == 100 and server.copied_bytes == 100
    assert client.rendezvous_bytes == n and server.rendezvous_bytes == n


def wait_for_offer(client, key, before=None):
    """Wait until the client's progress thread holds an offer for its PUSH of
    key, chunk 0, other than `before` (it takes offers in without its reader)."""
    deadline = time.monotonic() + TIMEOUT
    while client._offers.peer_offer(protocol.tag(Op.PUSH, key, 0, 0)) in (None, before):
        assert time.monotonic() < deadline, f"the offer for key {key} never arrived"
        time.sleep(0.01)


def offered(client, server, dest, key=7, round_=0):
    """server offers dest for the client's PUSH of key, chunk 0, round_."""
    before = client._offers.peer_offer(protocol.tag(Op.PUSH, key, 0, round_))
    server.offer(protocol.tag(Op.PUSH, key, 0, round_), dest)
    wait_for_offer(client, key, before)


def test_offered_buffer_is_written_in_place(pair):
    client, server = pair
    n = 1 << 20
    data = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8)
    dest = np.zeros(n, np.uint8)
    offered(client, server, dest)
    client.send(header(n, key=7), data)
    h, got = receive(server, dest)
    assert (h.op, h.key, h.length) == (Op.PUSH, 7, n)
    np.testing.assert_array_equal(dest, data)
    assert client.placed_bytes == n and server.placed_bytes == n
    assert client.rendezvous_bytes == 0 and server.copied_bytes == 0
    assert all(entry.leases == 0 for entry in server._resources.mr_cache._entries.values())


def test_offer_for_another_round_waits_for_that_round(pair):
    client, server = pair
    n = 100_000
    dest = np.zeros(n, np.uint8)
    offered(client, server, dest, round_=1)
    # Not the offered round: a rendezvous, so the send waits for the receiver.
    sender = threading.Thread(target=client.send, args=(header(n, key=7, round_=0), np.full(n, 1, np.uint8)))
    sender.start()
    receive(server)
    sender.join(TIMEOUT)
    assert not dest.any() and server.rendezvous_bytes == n
    client.send(header(n, key=7, round_=1), np.full(n, 2, np.uint8))
    receive(server, dest)
    assert (dest == 2).all() and server.placed_bytes == n


def test_a_later_offer_replaces_the_earlier_one(pair):
    client, server = pair
    n = 100_000
    first, second = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    offered(client, server, first)
    offered(client, server, second)
    client.send(header(n, key=7), np.full(n, 5, np.uint8))
    receive(server, second)
    assert (second == 5).all() and not first.any()
    assert server.placed_bytes == n and not server._offers.open_offers


def test_receiving_elsewhere_than_offered_copies(pair):
    client, server = pair
    n = 100_000
    dest, elsewhere = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    offered(client, server, dest)
    client.send(header(n, key=7), np.full(n, 9, np.uint8))
    receive(server, elsewhere)
    assert (elsewhere == 9).all() and server.copied_bytes == n


def test_a_message_that_does_not_fit_its_offer_is_refused(pair):
    client, server = pair
    n = 100_000
    offered(client, server, np.zeros(n, np.uint8))
    tag = protocol.tag(Op.PUSH, 7, 0, 0)
    forged = client._offers.peer_offer(tag)._replace(sequence=5)    # a peer that ignores the offer's round
    client._offers._theirs[tag.stream] = forged
    client.send(header(n, key=7, round_=5), np.ones(n, np.uint8))
    with pytest.raises(ProtocolError, match=r"round 5 .* into the buffer offered for PUSH key 7 chunk 0 round 0"):
        server.recv_header(TIMEOUT)


def test_offers_beyond_the_credits_come_back_without_a_reader(pair, verbs):
    """Each offer takes a credit; the peer's progress thread returns them, so an
    offering side never stalls on a peer whose reader is busy elsewhere."""
    client, server = pair
    n, keys = verbs.EAGER_LIMIT + 1, 3 * verbs.frames.DATA_SLOTS
    dests = [np.zeros(n, np.uint8) for _ in range(keys)]
    for key, dest in enumerate(dests):
        server.offer(protocol.tag(Op.PUSH, key, 0, 0), dest)     # would block for credit if none came back
    for key in range(keys):
        wait_for_offer(client, key)
        client.send(header(n, key=key), np.full(n, key % 251, np.uint8))
        receive(server, dests[key])
        assert (dests[key] == key % 251).all()
    assert server.placed_bytes == keys * n and server.copied_bytes == 0


def test_bench_transport_over_verbs():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_transport.py"), "--transport", "verbs",
                          "--sizes", "4096,1048576", "--seconds", "0.02"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "transport verbs" in out and re.search(r"^\s*1 MiB\s+\d", out, re.M), out


def test_close_wakes_a_blocked_receiver_and_is_idempotent(pair):
    client, server = pair
    box = {}

    def blocked():
        start = time.monotonic()
        try:
            server.recv_header(60)
        except ConnectionClosed as exc:
            box["exc"] = exc
        box["took"] = time.monotonic() - start

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.3)
    server.close()
    server.close()
    t.join(10)
    assert isinstance(box.get("exc"), ConnectionClosed) and box["took"] < 10
    with pytest.raises(ConnectionClosed):
        server.send(header(0))


def test_peer_close_is_end_of_stream_after_its_messages(pair):
    client, server = pair
    for i in range(5):
        client.send(header(10, key=i), bytes(10))
    client.close()
    for i in range(5):
        assert receive(server)[0].key == i
    with pytest.raises(EndOfStream, match="127.0.0.1"):
        server.recv_header(TIMEOUT)


CHILD = """
import sys, time
from rdmakv.core import protocol
from rdmakv.core.protocol import Op
from rdmakv.transport import verbs
conn = verbs.connect("127.0.0.1", int(sys.argv[1]), 20)
conn.send(protocol.pack(Op.PUSH, length=5), b"hello")
print("sent", flush=True)
time.sleep(120)
"""


def test_peer_death_is_connection_closed_naming_the_peer(verbs):
    listener = verbs.Listener("127.0.0.1", 0, TIMEOUT)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(listener.address[1])], stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=REPO))
    try:
        conn = listener.accept(60)
        assert conn is not None
        h, got = receive(conn)
        assert bytes(got) == b"hello"
        assert child.stdout.readline().strip() == b"sent"
        # A large send waits for the peer's clear-to-send when it dies.
        box = {}

        def sender():
            try:
                conn.send(header(1 << 20), np.zeros(1 << 20, np.uint8))
            except TransportError as exc:
                box["exc"] = exc

        t = threading.Thread(target=sender)
        t.start()
        time.sleep(0.5)
        child.kill()
        start = time.monotonic()
        with pytest.raises(ConnectionClosed, match=r"127\.0\.0\.1") as info:
            while conn.recv_header(1.0) is None:
                assert time.monotonic() - start < TIMEOUT
        assert not isinstance(info.value, EndOfStream)
        t.join(TIMEOUT)
        assert isinstance(box.get("exc"), ConnectionClosed) and "127.0.0.1" in str(box["exc"])
        assert time.monotonic() - start < 10
        conn.close()
    finally:
        child.kill()
        child.wait()
        listener.close()


def test_failed_work_completion_fails_only_that_connection(pair_factory, verbs):
    """A clear-to-send with a wrong rkey makes the RDMA write fail: send()
    raises WorkCompletionError naming the peer, the operation and the status;
    another connection in the process keeps working."""
    (c1, s1), (c2, s2) = pair_factory(timeout=5.0), pair_factory()
    original = s1._sender.post_frame

    def corrupt(kind, ident, *args, rkey=0, **kwargs):
        if kind == verbs.frames.K_CTS:
            rkey ^= 0x5A5A00
        return original(kind, ident, *args, rkey=rkey, **kwargs)

    s1._sender.post_frame = corrupt
    box = {}

    def reader():
        try:
            receive(s1)
        except TransportError as exc:
            box["reader"] = exc

    t = threading.Thread(target=reader)
    t.start()
    with pytest.raises(WorkCompletionError) as info:
        c1.send(header(1 << 20), np.ones(1 << 20, np.uint8))
    message = str(info.value)
    assert "RDMA write to 127.0.0.1" in message and info.value.status_str in message
    assert info.value.status != 0
    t.join(TIMEOUT)
    assert isinstance(box.get("reader"), TransportError)
    with pytest.raises(TransportError):
        c1.send(header(10), bytes(10))
    # The other connection is unaffected.
    data = np.arange(1 << 20, dtype=np.uint8)
    t = threading.Thread(target=c2.send, args=(header(data.nbytes), data))
    t.start()
    np.testing.assert_array_equal(receive(s2)[1], data)
    t.join(TIMEOUT)


def test_tcp_peer_is_refused_clearly(verbs):
    from rdmakv.transport import tcp
    listener = tcp.Listener("127.0.0.1", 0, 5)
    try:
        box = {}
        t = threading.Thread(target=lambda: box.update(conn=listener.accept(10)))
        t.start()
        with pytest.raises(TransportError):
            verbs.connect("127.0.0.1", listener.address[1], 3)
        t.join(10)
        if box.get("conn"):
            box["conn"].close()
    finally:
        listener.close()


def test_selection(monkeypatch):
    from rdmakv.transport import tcp, verbs
    assert rdmakv.has("verbs")
    assert choose_transport("verbs")[0] is verbs
    module, why = choose_transport("auto")            # shared memory for co-located peers, over verbs
    assert module.inner is verbs and verbs_devices.select_port().device in why
    monkeypatch.setenv("RDMAKV_SHM", "0")
    module, why = choose_transport("auto")
    assert module is verbs and "auto" in why and verbs_devices.select_port().device in why
    monkeypatch.delenv("RDMAKV_SHM")
    assert choose_transport("tcp")[0] is tcp
    monkeypatch.setenv("RDMAKV_IB_DEVICE", "no_such_dev")
    with pytest.raises(DeviceUnavailable, match="no_such_dev"):
        choose_transport("verbs")
    module, why = choose_transport("auto")
    assert module.inner is tcp and "no_such_dev" in why


def test_timeout_is_bounded(pair_factory):
    client, server = pair_factory(timeout=1.0)
    # Nobody reads the rendezvous on the other side: the sender gives up after the timeout.
    start = time.monotonic()
    with pytest.raises(PeerTimeout, match="clear-to-send"):
        client.send(header(1 << 20), np.zeros(1 << 20, np.uint8))
    assert time.monotonic() - start < 5
