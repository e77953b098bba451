"""The verbs stream the native engines run (rdmakv/native/verbs_stream.c,
rdmakv/transport/verbs/stream.py) over real verbs in the soft-RoCE VM: the
transport contract, the end of a peer, bounded waits, and a hostile peer's
immediates and sends."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rdmakv.core import protocol
from rdmakv.core.errors import ConnectionClosed, EndOfStream, PeerTimeout, ProtocolError, TransportError
from rdmakv.core.protocol import Op
from rdmakv.transport.verbs import devices as verbs_devices

USABLE, REASON = verbs_devices.probe()
pytestmark = [pytest.mark.rdma, pytest.mark.skipif(not USABLE, reason=f"no usable RDMA device: {REASON}")]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 20.0


@pytest.fixture
def stream_pair(pair_factory):
    """A factory of connected (client, server) verbs streams, the native engines' kind."""
    return lambda timeout=TIMEOUT: pair_factory(timeout, native=True)


def receive(conn, timeout=TIMEOUT):
    header = conn.recv_header(timeout)
    assert header is not None, "no message"
    payload = np.empty(header.length, np.uint8)
    if header.length:
        conn.recv_payload(header, payload)
    return header, payload


def echo(conn, count):
    for _ in range(count):
        header, payload = receive(conn)
        conn.send(protocol.pack(Op.RESULT, length=header.length, key=header.key),
                  payload if header.length else None)


def test_the_listener_answers_in_kind(stream_pair):
    from rdmakv.transport.verbs.stream import VerbsStreamConnection
    client, server = stream_pair()
    assert type(client) is VerbsStreamConnection and type(server) is VerbsStreamConnection
    assert client.features.plain_frames and not client.features.places


@pytest.mark.parametrize("size", [0, 1, 100, 4096, 100_000, 1 << 20, (4 << 20) + 3])
def test_frames_of_every_size_arrive_whole(stream_pair, size):
    """Larger than the 2 MiB ring too: it crosses in pieces as credit comes back."""
    client, server = stream_pair()
    thread = threading.Thread(target=echo, args=(server, 1))
    thread.start()
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    client.send(protocol.pack(Op.PUSH, length=size, key=size), data if size else None)
    header, back = receive(client)
    thread.join(TIMEOUT)
    assert header.op == Op.RESULT and header.key == size
    np.testing.assert_array_equal(back, data)


def test_many_messages_both_ways_at_once_keep_their_order(stream_pair):
    client, server = stream_pair()
    count = 600
    sizes = [(i * 7919) % 70_000 for i in range(count)]
    errors = []

    def pump(conn, op):
        try:
            for i, n in enumerate(sizes):
                conn.send(protocol.pack(op, length=n, key=i), np.full(n, i % 251, np.uint8) if n else None)
        except Exception as exc:         # reported by the main thread
            errors.append(exc)

    def drain(conn, op):
        try:
            for i, n in enumerate(sizes):
                header, payload = receive(conn)
                assert (header.op, header.key, header.length) == (op, i, n)
                assert (payload == i % 251).all()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pump, args=(client, Op.PUSH)),
               threading.Thread(target=pump, args=(server, Op.RESULT)),
               threading.Thread(target=drain, args=(server, Op.PUSH)),
               threading.Thread(target=drain, args=(client, Op.RESULT))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)


def test_a_peer_that_closes_is_the_end_of_the_stream_after_its_messages(stream_pair):
    client, server = stream_pair()
    for i in range(5):
        client.send(protocol.pack(Op.PUSH, length=10_000, key=i), np.full(10_000, i, np.uint8))
    client.close()
    for i in range(5):
        header, payload = receive(server)
        assert header.key == i and (payload == i).all()
    with pytest.raises(EndOfStream):
        server.recv_header(TIMEOUT)


PEER = """
import sys, time, numpy as np
from rdmakv.transport import verbs
from rdmakv.core import protocol
from rdmakv.core.protocol import Op
conn = verbs.connect("127.0.0.1", int(sys.argv[1]), 20.0, native=True)
conn.send(protocol.pack(Op.PUSH, length=4, key=7), np.arange(4, dtype=np.uint8))
print("sent", flush=True)
time.sleep(600)
"""


def test_a_peer_killed_outright_ends_the_stream_at_once():
    from rdmakv.transport import verbs
    listener = verbs.Listener("127.0.0.1", 0, TIMEOUT)
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(listener.address[1])], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=REPO))
    server = None
    try:
        deadline = time.monotonic() + 60
        while server is None and time.monotonic() < deadline:
            server = listener.accept(1.0)
        assert server is not None
        assert peer.stdout.readline() == b"sent\n"
        header, payload = receive(server)
        assert header.key == 7 and list(payload) == [0, 1, 2, 3]
        peer.send_signal(signal.SIGKILL)
        peer.wait(10)
        started = time.monotonic()
        with pytest.raises((EndOfStream, ConnectionClosed)):
            server.recv_header(TIMEOUT)
        assert time.monotonic() - started < TIMEOUT / 2
    finally:
        peer.kill()
        peer.wait()
        if server is not None:
            server.close()
        listener.close()


def test_a_message_cut_short_times_out_naming_the_setting(stream_pair):
    client, server = stream_pair(timeout=2.0)
    client.send(protocol.pack(Op.PUSH, length=1000, key=1), None)     # a header promising bytes never sent
    header = server.recv_header(TIMEOUT)
    started = time.monotonic()
    with pytest.raises(PeerTimeout, match="RDMAKV_TIMEOUT"):
        server.recv_payload(header, np.empty(1000, np.uint8))
    assert time.monotonic() - started < 10


def test_shutting_a_stream_wakes_its_blocked_receiver(stream_pair):
    client, server = stream_pair()
    box = {}

    def wait():
        try:
            server.recv_header(60)
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.5)
    server.shut()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(box.get("error"), (EndOfStream, ConnectionClosed))


def _peer_ring(server):
    addr, rkey, nbytes = server.endpoint["ring"]
    return addr, rkey, nbytes


def test_an_immediate_past_the_ring_stops_the_stream(stream_pair):
    """A peer naming a head more than a ring ahead of what we read is refused:
    nothing it sends can make us read outside our ring."""
    client, server = stream_pair()
    addr, rkey, nbytes = _peer_ring(server)
    client._qp.post_write(None, 0, 0, addr, rkey, wr_id=0, imm=nbytes + 4096)
    with pytest.raises(ProtocolError, match="ring counters cannot be"):
        server.recv_header(TIMEOUT)


def test_a_send_with_bytes_fails_only_that_stream(stream_pair):
    """Our receives take immediates only: a SEND carrying bytes fails the
    receive (a work completion error), which ends this stream and no other."""
    from rdmakv.native import transport as t
    client, server = stream_pair()
    other_client, other_server = stream_pair()
    junk = bytearray(64)
    mr = t.MR(client._pd, junk, t.IBV_ACCESS_LOCAL_WRITE)
    try:
        client._qp.post_send(mr, 0, 64, wr_id=0)
        with pytest.raises((TransportError, ConnectionClosed, EndOfStream)):
            server.recv_header(TIMEOUT)
    finally:
        client.close()
        mr.close()
    other_client.send(protocol.pack(Op.PUSH, length=3, key=5), b"abc")
    header, payload = receive(other_server)
    assert header.key == 5 and bytes(payload) == b"abc"
