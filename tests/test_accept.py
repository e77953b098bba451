"""Attacks on the accept path and the shared-memory set-up (issue 11, items 1,
2, 5 and 9): silent local connections, a descriptor flood, idle
authenticated connections, a process of another uid at the shared-memory
socket, and a flood of refused set-ups.  Attacks "from another uid" run in a
forked child as nobody."""
import fcntl
import json
import logging
import os
import resource
import socket
import threading
import time

import numpy as np
import pytest

import rdmakv
from rdmakv.control import auth
from rdmakv.core.netif import free_port
from rdmakv.native import transport as _t
from rdmakv.transport import shm, tcp

NOBODY = 65534
SECRET = "issue 11"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
needs_shm = pytest.mark.skipif(shm.unavailable() is not None, reason="no shared memory here")


def as_nobody(fn):
    """fn() run in a forked child as uid/gid nobody; returns its JSON-able result (or raises
    what it raised, as text).  fn must bound its own waits."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = {"ok": fn()}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        finally:
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(result))
            os._exit(code)
    os.close(write_end)
    try:
        with os.fdopen(read_end) as source:
            result = json.loads(source.read())
    finally:
        os.waitpid(pid, 0)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["ok"]


def raw_shm_setup(name, ring=65536):
    """What a hand-written client sends to a shared-memory socket: a sealed ring
    segment and the set-up line.  Returns the listener's answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(name)
        fd = os.memfd_create("attacker", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, _t.shm_segment_bytes(ring))
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        try:
            socket.send_fds(sock, [json.dumps({"rdmakv_shm": 1, "ring_bytes": ring}).encode()], [fd])
        except OSError:                  # refused before it could send: the answer is waiting
            pass
        os.close(fd)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return json.loads(answer) if answer else None
    finally:
        sock.close()


def accept_in_thread(listener, timeout):
    """Run listener.accept(timeout) in a thread; returns (thread, result dict)."""
    got = {}
    thread = threading.Thread(target=lambda: got.setdefault("c", listener.accept(timeout)), daemon=True)
    thread.start()
    return thread, got


def abstract_name_bound(name):
    wanted = "@" + name[1:].decode()
    with open("/proc/net/unix") as table:
        return any(line.split()[-1] == wanted for line in table.readlines()[1:] if len(line.split()) > 7)


def proc_counts(pid):
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def exact_round(kv):
    value = np.arange(1000, dtype=np.int64) * (kv.rank + 1)
    out = kv.pushpull("k", value, out=np.empty_like(value))
    assert np.array_equal(out, np.arange(1000, dtype=np.int64) * 3)
    return True


# ---- 1: silent connections at the shared-memory socket -------------------------------------

@needs_shm
@pytest.mark.timeout(120)
def test_silent_local_connections_do_not_stop_workers_from_joining(cluster_factory):
    port = free_port()
    cluster = cluster_factory(2, 1, RDMAKV_SECRET=SECRET, RDMAKV_PORT=port, RDMAKV_TIMEOUT=10,
                              RDMAKV_TRANSPORT="auto")
    name = shm.listener._endpoint("127.0.0.1", port)
    deadline = time.monotonic() + 20
    while not abstract_name_bound(name):
        assert time.monotonic() < deadline, "the server never offered shared memory"
        time.sleep(0.05)
    silent = []
    try:
        for _ in range(12):             # same user: they pass the uid check and say nothing
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(name)
            silent.append(sock)
        start = time.monotonic()
        assert cluster.run(exact_round, timeout=60) == [True, True]
        assert all(type(link.connection).__name__ == "ShmConnection"
                   for kv in cluster.stores for link in kv._links)
        print(f"\nFIGURE silent shm connections: 2 workers joined over shared memory and summed exactly "
              f"in {time.monotonic() - start:.1f} s with 12 silent connections open")
    finally:
        for sock in silent:
            sock.close()


# ---- 2: the descriptor limit, caps, idle authenticated connections -----------------------------

@pytest.mark.timeout(120)
def test_the_accept_loop_survives_the_descriptor_limit(cluster_factory):
    cluster = cluster_factory(2, 1, RDMAKV_TIMEOUT=20)
    cluster.raw_connection().close()
    scheduler = cluster.procs[0].pid
    time.sleep(0.5)                      # the server has joined: its connection is counted below
    _, fds = proc_counts(scheduler)
    resource.prlimit(scheduler, resource.RLIMIT_NOFILE, (fds + 16, fds + 16))
    flood = []
    try:
        for _ in range(100):
            try:
                flood.append(socket.create_connection((cluster.host, cluster.port), timeout=1))
            except OSError:
                break
        time.sleep(1.5)                  # the scheduler is out of descriptors meanwhile
    finally:
        for sock in flood:
            sock.close()
    assert len(flood) > 16, "the flood did not reach the descriptor limit"
    assert cluster.run(exact_round, timeout=60) == [True, True]
    complaints = [line for line in cluster.logs[0] if "Too many open files" in line]
    assert 1 <= len(complaints) <= 5, list(cluster.logs[0])
    print(f"\nFIGURE descriptor limit: {len(flood)} connections against a limit of {fds + 16} fds; "
          f"{len(complaints)} log lines, e.g. {complaints[0].split(' WARNING ')[-1]!r}; workers exact after")


@pytest.mark.timeout(120)
def test_a_flood_of_unauthenticated_connections_costs_descriptors_not_threads(cluster_factory):
    from rdmakv.control.node import UNAUTHENTICATED_PER_SOURCE
    cluster = cluster_factory(2, 1, RDMAKV_SECRET=SECRET, RDMAKV_TIMEOUT=20)
    cluster.raw_connection().close()
    scheduler = cluster.procs[0].pid
    time.sleep(0.5)
    threads, fds = proc_counts(scheduler)
    flood = []
    try:
        for _ in range(300):             # from another address on this host: a stranger
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.settimeout(2)
            try:
                sock.connect((cluster.host, cluster.port))
            except OSError:
                sock.close()
                continue
            flood.append(sock)
        time.sleep(1.0)
        during = proc_counts(scheduler)
        refused = 0
        for sock in flood:
            sock.settimeout(0.2)
            try:
                received = b""
                while chunk := sock.recv(4096):
                    received += chunk
                refused += b"too many" in received
            except OSError:
                pass
        # Real workers from 127.0.0.1 join meanwhile.
        assert cluster.run(exact_round, timeout=60) == [True, True]
    finally:
        for sock in flood:
            sock.close()
    assert during[0] <= threads + 2, f"threads {threads} -> {during[0]} during the flood"
    assert during[1] <= fds + UNAUTHENTICATED_PER_SOURCE + 4, f"fds {fds} -> {during[1]} during the flood"
    assert refused >= len(flood) - UNAUTHENTICATED_PER_SOURCE, (refused, len(flood))
    print(f"\nFIGURE unauthenticated flood: {len(flood)} connections, {refused} refused at once; "
          f"scheduler threads/fds {threads}/{fds} -> {during[0]}/{during[1]}; workers exact meanwhile")


def test_squatters_from_the_nodes_own_address_cannot_keep_them_out(cluster_factory):
    # A stranger on the same host connects from 127.0.0.1, as the real nodes do, and keeps
    # every slot of that source (and reopens what is closed): the waiting squatters give way.
    from rdmakv.control.node import UNAUTHENTICATED_PER_SOURCE
    cluster = cluster_factory(2, 1, RDMAKV_SECRET=SECRET, RDMAKV_TIMEOUT=20)
    cluster.raw_connection().close()
    stop = threading.Event()
    squatters = []

    def squat():
        while not stop.is_set():
            squatters[:] = [s for s in squatters if s.fileno() >= 0]
            while len(squatters) < 2 * UNAUTHENTICATED_PER_SOURCE and not stop.is_set():
                try:
                    squatters.append(socket.create_connection((cluster.host, cluster.port), timeout=2))
                except OSError:
                    break
            for sock in list(squatters):      # keep the challenge unanswered; reopen what was let go
                sock.setblocking(False)
                try:
                    if sock.recv(4096) != b"":
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                sock.close()
            time.sleep(0.05)

    squatter = threading.Thread(target=squat, daemon=True)
    squatter.start()
    try:
        time.sleep(1.0)
        assert len(squatters) >= UNAUTHENTICATED_PER_SOURCE
        started = time.monotonic()
        assert cluster.run(exact_round, timeout=60) == [True, True]
        took = time.monotonic() - started
    finally:
        stop.set()
        squatter.join(10)
        for sock in squatters:
            sock.close()
    print(f"\nFIGURE squatters: {2 * UNAUTHENTICATED_PER_SOURCE} idle connections from 127.0.0.1 kept open; "
          f"2 workers joined and summed exactly in {took:.2f} s")


@pytest.mark.timeout(60)
def test_an_authenticated_connection_that_never_introduces_itself_is_closed(cluster_factory):
    cluster = cluster_factory(2, 1, RDMAKV_TIMEOUT=3)     # no secret: anyone authenticates
    stores = cluster.connect()
    idle = [auth.open_connection(tcp, cluster.host, cluster.port, None, 3),
            auth.open_connection(tcp, *stores[0]._links[0].address, None, 3)]
    try:
        for connection in idle:
            with pytest.raises(rdmakv.core.errors.EndOfStream):
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    connection.recv_header(1.0)
    finally:
        for connection in idle:
            connection.close()
    assert cluster.run(exact_round) == [True, True]


# ---- 5: another uid at the shared-memory socket ---------------------------------------------

@needs_root
@needs_shm
def test_another_uid_gets_no_mapping_without_the_setting(monkeypatch):
    monkeypatch.delenv("RDMAKV_SHM_ALLOW_UIDS", raising=False)
    listener = shm.over(tcp).Listener("127.0.0.1", 0, 5)
    try:
        name = shm.listener._endpoint(*listener.address)
        thread, got = accept_in_thread(listener, 3)
        answer = as_nobody(lambda: raw_shm_setup(name))
        thread.join(10)
        assert answer["ok"] is False and "uid 65534" in answer["error"], answer
        assert got["c"] is None
    finally:
        listener.close()


@needs_root
@needs_shm
def test_a_uid_named_in_the_setting_is_served(monkeypatch):
    monkeypatch.setenv("RDMAKV_SHM_ALLOW_UIDS", str(NOBODY))
    listener = shm.over(tcp).Listener("127.0.0.1", 0, 5)
    try:
        name = shm.listener._endpoint(*listener.address)
        thread, got = accept_in_thread(listener, 5)
        answer = as_nobody(lambda: raw_shm_setup(name))
        thread.join(10)
        assert answer == {"ok": True}
        assert type(got["c"]).__name__ == "ShmConnection"
        got["c"].close()
    finally:
        listener.close()


@needs_root
@needs_shm
def test_the_connector_refuses_a_listener_of_another_uid_unless_allowed(monkeypatch):
    """Both sides check: a listener run by nobody is refused by a root connector,
    and served once the connector names nobody in RDMAKV_SHM_ALLOW_UIDS."""
    monkeypatch.setenv("RDMAKV_SHM_ALLOW_UIDS", "0")       # the child (nobody) lets root in
    ready, done = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            listener = shm.over(tcp).Listener("127.0.0.1", 0, 5)
            os.write(ready[1], str(listener.address[1]).encode().ljust(8))
            served = 0
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and served < 2:
                connection = listener.accept(0.2)
                if connection is not None:
                    served += 1
                    connection.close()
            os.read(done[0], 1)
            listener.close()
        finally:
            os._exit(0)
    try:
        port = int(os.read(ready[0], 8))
        monkeypatch.delenv("RDMAKV_SHM_ALLOW_UIDS")
        with pytest.raises(rdmakv.core.errors.TransportError, match="runs as uid 65534"):
            shm.over(tcp, forced=True).connect("127.0.0.1", port, 5)
        monkeypatch.setenv("RDMAKV_SHM_ALLOW_UIDS", str(NOBODY))
        connection = shm.over(tcp, forced=True).connect("127.0.0.1", port, 5)
        assert type(connection).__name__ == "ShmConnection"
        connection.close()
    finally:
        os.write(done[1], b"x")
        os.waitpid(pid, 0)


def test_a_bad_allow_uids_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("RDMAKV_SHM_ALLOW_UIDS", "nobody")
    with pytest.raises(rdmakv.core.errors.ConfigError, match="RDMAKV_SHM_ALLOW_UIDS"):
        shm.wanted("shm")


# ---- 9: a flood of refused set-ups is logged within a budget ----------------------------------

@needs_shm
@pytest.mark.timeout(60)
def test_refused_shared_memory_connections_are_logged_within_a_budget(caplog):
    listener = shm.over(tcp).Listener("127.0.0.1", 0, 5)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            connection = listener.accept(0.1)
            if connection is not None:
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    sent = 0
    try:
        name = shm.listener._endpoint(*listener.address)
        with caplog.at_level(logging.WARNING, logger="rdmakv.transport"):
            thread.start()
            start = time.monotonic()
            for _ in range(1000):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(name)          # blocks while the listener's backlog is full
                    sent += 1
                    try:
                        sock.sendall(b"hello\n")
                    except OSError:             # already refused (too many set-ups at once)
                        pass
            elapsed = time.monotonic() - start
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(10)
        listener.close()
    refusals = [r for r in caplog.records if "shared-memory" in r.getMessage()]
    assert 1 <= len(refusals) <= 25, f"{len(refusals)} lines logged for {sent} refusals"
    print(f"\nFIGURE refused shm set-ups: {sent} refused, {len(refusals)} log lines in {elapsed:.1f} s")
