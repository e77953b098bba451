"""The verbs accept path under attack (issue 11, items 1 and 2), on a real
device: connections that say nothing at a verbs port, or that finish the
verbs set-up and then never authenticate, cost the server no QP and no thread,
never hold up the real peers, and beyond the caps are refused naming the cap."""
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rdmakv.control import auth
from rdmakv.core import protocol
from rdmakv.core.errors import TransportError
from rdmakv.core.protocol import Op
from rdmakv.control.peer import Handler
from rdmakv.transport.verbs import devices as verbs_devices

from rdmakv.core.netif import free_port

USABLE, REASON = verbs_devices.probe()
pytestmark = [pytest.mark.rdma, pytest.mark.skipif(not USABLE, reason=f"no usable RDMA device: {REASON}")]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 30.0
SECRET = "issue 11"


@pytest.fixture
def verbs():
    from rdmakv.transport import verbs
    return verbs


def channels_open():
    """Completion channels this process holds: one per verbs connection set up."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[infinibandevent]"
        except OSError:
            pass
    return count


def silent_sockets(port, n, source="127.0.0.1"):
    out = []
    for _ in range(n):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        out.append(sock)
    return out


def refusal(sock, timeout):
    """The error a listener sent before closing `sock` (its set-up message's "error")."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:     # it read nothing we sent: what it wrote came first
            break
        if not chunk:
            break
        data += chunk
    (length,) = struct.unpack("<I", data[8:12])
    return json.loads(data[12:12 + length])["error"]


class Pump:
    """Drives listener.accept() in a thread, keeping what it returns."""

    def __init__(self, listener):
        self.listener, self.accepted, self._stop = listener, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            connection = self.listener.accept(0.1)
            if connection is not None:
                self.accepted.append(connection)

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        for connection in self.accepted:
            connection.close()


def test_silent_connections_cost_nothing_and_do_not_stall_accept(verbs):
    listener = verbs.Listener("127.0.0.1", 0, TIMEOUT)
    verbs.devices.SharedDevice.acquire()            # the device's own event fd is counted from here on
    before = channels_open()
    silent = silent_sockets(listener.address[1], 12)
    box = {}
    try:
        # accept() never waits on them, and nothing is allocated for them.
        done = threading.Event()
        thread = threading.Thread(target=lambda: (listener.accept(1.0), done.set()), daemon=True)
        thread.start()
        time.sleep(0.5)
        assert channels_open() == before, "a completion channel (PD, CQ, QP) exists for a silent connection"
        thread.join(10)
        assert done.is_set()
        # A real peer is accepted while the 12 are still open.
        client = threading.Thread(target=lambda: box.update(c=verbs.connect("127.0.0.1", listener.address[1],
                                                                            TIMEOUT)))
        client.start()
        start = time.monotonic()
        server = listener.accept(TIMEOUT)
        client.join(TIMEOUT)
        assert server is not None and "c" in box
        elapsed = time.monotonic() - start
        data = np.arange(1000, dtype=np.int64)
        box["c"].send(protocol.pack(Op.PUSH, length=data.nbytes), data)
        header = server.recv_header(TIMEOUT)
        got = np.empty_like(data)
        server.recv_payload(header, got)
        assert np.array_equal(got, data)
        assert channels_open() == before + 2
        # Past their deadline the silent ones are refused, with the reason.
        pump = Pump(listener)
        try:
            reason = refusal(silent[0], verbs.listener.SETUP_SECONDS + 10)
        finally:
            pump.stop()
        assert f"sent no verbs set-up message within {verbs.listener.SETUP_SECONDS:g} s" in reason
        print(f"\nFIGURE silent verbs connections: a real verbs peer was accepted in {elapsed:.2f} s with 12 "
              f"silent connections open, which held no completion channel; they were refused with "
              f"{reason!r}")
        server.close()
    finally:
        for sock in silent:
            sock.close()
        if "c" in box:
            box["c"].close()
        listener.close()
        verbs.devices.SharedDevice.release()


def test_setups_beyond_the_caps_are_refused_naming_the_cap(verbs, caplog):
    listener = verbs.Listener("127.0.0.1", 0, TIMEOUT)
    port = listener.address[1]
    pump = Pump(listener)
    silent = []
    try:
        silent += silent_sockets(port, verbs.listener.MAX_SETUPS_PER_SOURCE)
        time.sleep(0.5)
        with pytest.raises(TransportError, match=f"refused by the peer: {verbs.listener.MAX_SETUPS_PER_SOURCE} verbs "
                                                 f"set-ups from 127.0.0.1 are already in progress"):
            verbs.connect("127.0.0.1", port, TIMEOUT)
        # Another source still gets in, up to the total.
        silent += silent_sockets(port, verbs.listener.MAX_SETUPS - verbs.listener.MAX_SETUPS_PER_SOURCE, source="127.0.0.2")
        time.sleep(0.5)
        late = silent_sockets(port, 1, source="127.0.0.3")[0]
        silent.append(late)
        assert refusal(late, 10) == f"{verbs.listener.MAX_SETUPS} verbs set-ups are already in progress"
        # A flood of refusals is logged within a budget.
        with caplog.at_level(logging.WARNING, logger="rdmakv.transport.verbs"):
            for sock in silent_sockets(port, 100, source="127.0.0.4"):
                refusal(sock, 10)
                sock.close()
        lines = [r for r in caplog.records if "refused a verbs connection" in r.getMessage()]
        assert 1 <= len(lines) <= 20
        print(f"\nFIGURE verbs set-up caps: beyond {verbs.listener.MAX_SETUPS_PER_SOURCE} from one address and "
              f"{verbs.listener.MAX_SETUPS} in all, refused naming the cap; 100 refusals made {len(lines)} log lines")
    finally:
        pump.stop()
        for sock in silent:
            sock.close()
        listener.close()


ATTACKER = r"""
import socket, sys, time
from rdmakv.transport import verbs
port, n = int(sys.argv[1]), int(sys.argv[2])
held = [verbs.connect("127.0.0.1", port, 60) for _ in range(n)]      # set up, then never authenticate
held += [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]   # silent
print("ready", flush=True)
time.sleep(120)
"""


class Sink(Handler):
    def on_message(self, peer, header, payload):
        self.got = header


def test_unauthenticated_verbs_connections_hold_no_thread(verbs):
    """The gate authenticates verbs connections without a thread each: 12
    connections that finished the verbs set-up but never answer the challenge,
    and 12 silent ones, start no thread in the server; a real peer still
    authenticates and is served."""
    from rdmakv.control.node import Gate
    listener = verbs.Listener("127.0.0.1", 0, TIMEOUT)
    running = threading.Event()
    running.set()
    sink = Sink()
    gate = threading.Thread(target=Gate(listener, sink, SECRET.encode(), TIMEOUT, "worker").run,
                            args=(running.is_set,), daemon=True)
    gate.start()
    attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, str(listener.address[1]), "12"],
                                stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO))
    client = None
    try:
        threads = threading.active_count()
        assert attacker.stdout.readline().strip() == b"ready"
        time.sleep(1.0)
        grown = threading.active_count() - threads
        assert grown == 0, f"{grown} threads for 24 unauthenticated connections"
        client = auth.open_connection(verbs, "127.0.0.1", listener.address[1], SECRET.encode(), TIMEOUT)
        client.send(protocol.pack(Op.HELLO, length=0))
        deadline = time.monotonic() + TIMEOUT
        while getattr(sink, "got", None) is None:
            assert time.monotonic() < deadline, "the authenticated peer was never served"
            time.sleep(0.05)
        assert sink.got.op == Op.HELLO
        print(f"\nFIGURE verbs gate: 12 set-up-but-silent and 12 silent verbs connections added {grown} threads; "
              f"a real peer authenticated and was read")
    finally:
        attacker.kill()
        attacker.wait()
        running.clear()
        gate.join(10)
        if client is not None:
            client.close()
        listener.close()


def test_silent_connections_to_a_verbs_server_do_not_stop_workers(cluster_factory, monkeypatch):
    """Issue 11's attack 1 on a verbs server: 12 silent connections to its port,
    then 2 verbs workers join and sum exactly (before: each silent connection
    held the accept loop for 10 s, and the workers timed out)."""
    monkeypatch.setenv("RDMAKV_TRANSPORT", "verbs")
    port = free_port()
    cluster = cluster_factory(2, 1, RDMAKV_SECRET=SECRET, RDMAKV_PORT=port, RDMAKV_TIMEOUT=60)
    silent = []
    deadline = time.monotonic() + 60
    try:
        while len(silent) < 12:
            try:
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the server never listened"
                time.sleep(0.1)
        start = time.monotonic()

        def exact_round(kv):
            value = np.arange(1000, dtype=np.int64) * (kv.rank + 1)
            out = kv.pushpull("k", value, out=np.empty_like(value))
            return bool(np.array_equal(out, np.arange(1000, dtype=np.int64) * 3))

        assert cluster.run(exact_round, timeout=120) == [True, True]
        assert all(type(link.connection).__name__ == "VerbsStreamConnection"     # the native data path's
                   for kv in cluster.stores for link in kv._links)
        print(f"\nFIGURE silent connections at a verbs server: 2 verbs workers joined and summed exactly in "
              f"{time.monotonic() - start:.1f} s with 12 silent connections open")
    finally:
        for sock in silent:
            sock.close()
