"""Integrity after the handshake (issue 11, item 12): with RDMAKV_INTEGRITY=1
every TCP record carries a MAC keyed per connection and direction, over a
sequence number.  A man in the middle that alters a tensor is detected (without
the mode the sum is silently wrong: the control case shows the attack is real),
as is a replayed, reordered or dropped record."""
import os
import socket
import threading

import numpy as np
import pytest

import rdmakv
from rdmakv.control import auth
from rdmakv.core import protocol

pytest.importorskip("blake3", reason="RDMAKV_INTEGRITY needs the blake3 package (ci/setup.sh installs it)")

from rdmakv.core.config import Config
from rdmakv.core.errors import ConfigError, IntegrityError
from rdmakv.core.protocol import Op
from rdmakv.transport import tcp
from rdmakv.worker.kvstore import KVStore

from socket_helpers import recv_exactly

SECRET = "integrity-test-secret"


def loopback_pair(timeout=5.0):
    """(a TcpConnection, the raw socket at its other end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        connection = tcp.connect("127.0.0.1", listener.getsockname()[1], timeout)
        raw, _ = listener.accept()
    return connection, raw


def test_replayed_reordered_and_altered_records_are_refused():
    keys = (os.urandom(32), os.urandom(32))
    sender, tap = loopback_pair()
    sender.protect(send_key=keys[0], recv_key=keys[1])
    payloads = [np.full(1000, i, np.int32) for i in range(3)]
    for i, payload in enumerate(payloads):
        sender.send(protocol.pack(Op.PUSH, length=payload.nbytes, round=i), payload)
    size = protocol.HEADER_SIZE + tcp.TAG_BYTES + 4000 + tcp.TAG_BYTES
    frames = [recv_exactly(tap, size) for _ in payloads]
    sender.close()
    tap.close()

    def deliver(*wire):
        receiver_end, injector = loopback_pair()
        receiver_end.protect(send_key=keys[1], recv_key=keys[0])
        for frame in wire:
            injector.sendall(frame)
        got = []
        try:
            for _ in wire:
                header = receiver_end.recv_header(5.0)
                out = np.empty(1000, np.int32)
                receiver_end.recv_payload(header, out)
                got.append((header.round, int(out[0])))
        finally:
            receiver_end.close()
            injector.close()
        return got

    assert deliver(*frames) == [(0, 0), (1, 1), (2, 2)]
    for wire in ([frames[0], frames[0]], [frames[1], frames[0]], [frames[0], frames[2]]):   # replay, reorder, drop
        with pytest.raises(IntegrityError, match="failed its integrity check"):
            deliver(*wire)
    altered = bytearray(frames[0])
    altered[protocol.HEADER_SIZE + tcp.TAG_BYTES + 100] ^= 1          # one bit of the tensor
    with pytest.raises(IntegrityError, match="a payload from .* failed its integrity check"):
        deliver(bytes(altered))
    altered = bytearray(frames[0])
    altered[20] ^= 1                                                  # the header's key
    with pytest.raises(IntegrityError, match="a header from"):
        deliver(bytes(altered))


class ResultTamperer:
    """A man in the middle between a worker and its server: relays both ways and
    adds 1 to the first byte of the tensor in every RESULT it sees, keeping any MAC
    it cannot forge.  `protected`: whether records after the handshake carry MACs."""

    def __init__(self, server_address, protected):
        self.server_address = server_address
        self.tag = tcp.TAG_BYTES if protected else 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = ("127.0.0.1", self.listener.getsockname()[1])
        self.altered = 0
        self.sockets = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        client, _ = self.listener.accept()
        server = socket.create_connection(self.server_address)
        self.sockets += [client, server]
        threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
        self._relay_results(server, client)

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def _relay_results(self, source, sink):
        handshake = True
        try:
            while True:
                head = recv_exactly(source, protocol.HEADER_SIZE + (0 if handshake else self.tag))
                header = protocol.unpack(head[:protocol.HEADER_SIZE])
                payload = bytearray(recv_exactly(source, header.length + (self.tag if header.length and not handshake
                                                                           else 0)))
                if header.op == Op.RESULT and header.length:
                    payload[0] = (payload[0] + 1) % 256
                    self.altered += 1
                if header.op == Op.AUTH_OK:
                    handshake = False
                sink.sendall(head + payload)
        except (OSError, AssertionError, rdmakv.ProtocolError):
            pass

    def close(self):
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def tampered_server_links(monkeypatch):
    """Route every worker's server connection of this process through a ResultTamperer."""
    proxies = []
    opened = KVStore._connect_servers

    def through_proxy(store, servers):
        routed = []
        for address in servers:
            proxy = ResultTamperer(tuple(address), store.config.integrity)
            proxies.append(proxy)
            routed.append(proxy.address)
        return opened(store, routed)

    monkeypatch.setattr(KVStore, "_connect_servers", through_proxy)
    yield proxies
    for proxy in proxies:
        proxy.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("integrity", [False, True])
def test_a_tensor_altered_on_the_way(cluster_factory, tampered_server_links, integrity):
    cluster = cluster_factory(num_workers=1, num_servers=1, RDMAKV_TRANSPORT="tcp", RDMAKV_SECRET=SECRET,
                              RDMAKV_INTEGRITY=int(integrity), RDMAKV_TIMEOUT=10)
    (kv,) = cluster.connect()
    value = np.arange(10_000, dtype=np.int32)
    if not integrity:
        result = kv.pushpull("w", value.copy())       # the attack works: silently wrong
        assert tampered_server_links[0].altered and not np.array_equal(result, value)
        return
    with pytest.raises(rdmakv.RdmaKVError, match="failed its integrity check") as caught:
        kv.pushpull("w", value.copy())
    assert tampered_server_links[0].altered
    print(f"\nFIGURE altered RESULT with RDMAKV_INTEGRITY=1: {caught.value}")


@pytest.mark.timeout(60)
def test_sums_are_exact_with_integrity(cluster_factory):
    cluster = cluster_factory(num_workers=2, num_servers=2, RDMAKV_TRANSPORT="tcp", RDMAKV_SECRET=SECRET,
                              RDMAKV_INTEGRITY=1, RDMAKV_PARTITION_BYTES=65536)
    sizes = [0, 1, 1000, 300_000]

    def work(kv):
        for rnd in range(3):
            handles = [kv.pushpull_async(f"k{i}", np.full(n, kv.rank + rnd + i, np.int64)) for i, n in enumerate(sizes)]
            for i, (n, handle) in enumerate(zip(sizes, handles)):
                assert np.array_equal(handle.wait(), np.full(n, 2 * (rnd + i) + 1, np.int64))
        kv.barrier()

    cluster.run(work)
    assert all(link.connection._send_key is not None for kv in cluster.stores for link in kv._links)


def test_integrity_needs_the_same_setting_and_a_secret(cluster_factory):
    with pytest.raises(ConfigError, match="RDMAKV_INTEGRITY needs a cluster secret"):
        Config.load(environ={"RDMAKV_INTEGRITY": "1"})
    cluster = cluster_factory(num_workers=1, num_servers=1, RDMAKV_TRANSPORT="tcp", RDMAKV_SECRET=SECRET)
    with pytest.raises(auth.AuthenticationError, match="does not use RDMAKV_INTEGRITY but this node does"):
        rdmakv.KVStore(**cluster.settings(integrity=True))


@pytest.mark.timeout(60)
def test_shared_memory_links_under_integrity(cluster_factory, caplog, monkeypatch):
    """Co-located workers keep shared memory (no MAC: it never leaves the host); their
    scheduler links are TCP and protected; sums stay exact."""
    monkeypatch.setattr(auth, "_unprotected_kinds", set())     # said once per process
    cluster = cluster_factory(num_workers=2, num_servers=1, RDMAKV_TRANSPORT="shm", RDMAKV_SECRET=SECRET,
                              RDMAKV_INTEGRITY=1)
    with caplog.at_level("INFO", logger="rdmakv.auth"):
        results = cluster.run(lambda kv: kv.pushpull("s", np.full(100_000, kv.rank + 1, np.int32)).copy())
    assert all(np.array_equal(r, np.full(100_000, 3, np.int32)) for r in results)
    for kv in cluster.stores:
        assert type(kv._links[0].connection).__name__ == "ShmConnection"
        assert kv._control.peer.connection._send_key is not None
    assert "RDMAKV_INTEGRITY covers TCP only: ShmConnection connections carry no MAC" in caplog.text
