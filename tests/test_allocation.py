"""What a peer can make a server (or the scheduler) allocate: nothing before
it has connected, and within the memory budget (RDMAKV_SERVER_MEMORY) after
(issue 11, items 3, 4 and 6).  Each attack runs against a real cluster and is
measured on the server process itself (/proc/PID/status, /proc/PID/fd)."""
import json
import os
import time
import tracemalloc

import numpy as np
import pytest

import rdmakv
from rdmakv.control import auth
from rdmakv.core import protocol
from rdmakv.core.errors import ConnectionClosed, EndOfStream, RemoteError
from rdmakv.core.protocol import Op
from rdmakv.server.server import CHUNK_COST, KEY_COST, ParameterServer
from rdmakv.transport import tcp

from cluster import run_threads

MiB = 1 << 20


def proc_status(pid, field):
    """A /proc/PID/status figure (VmRSS, VmSize, ...) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def hostile_connection(address):
    """An authenticated TCP connection to a server or the scheduler that has said nothing yet."""
    return auth.open_connection(tcp, address[0], address[1], None, 10)


def closed_by_peer(connection, wait):
    """True once the other side closes the connection within `wait` seconds."""
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            connection.recv_header(0.2)
    except (EndOfStream, ConnectionClosed):
        return True
    return False


def stores(cluster, *overrides):
    """The cluster's workers, worker i configured with overrides[i] (a dict)."""
    made, errors = run_threads([lambda i=i, extra=extra: rdmakv.KVStore(worker_id=i, **cluster.settings(**extra))
                                for i, extra in enumerate(overrides)])
    cluster.stores.extend(s for s in made if s is not None)
    assert errors == [None] * len(overrides), errors
    return made


def wait_refused(kv, key, timeout=20):
    """The error a server reported for key (a declaration gets no answer unless refused)."""
    deadline = time.monotonic() + timeout
    while kv._keys[key].error is None:
        assert time.monotonic() < deadline, f"key {key!r} was never refused"
        time.sleep(0.02)
    return kv._keys[key].error


def test_a_header_before_connect_allocates_nothing(cluster_factory):
    """Item 3: a SET_STATES header of 1 GiB (or any op) before CONNECT, and
    anything but a small HELLO to the scheduler, is refused from the header."""
    cluster = cluster_factory(1, 1, RDMAKV_TIMEOUT=10)
    kv, = cluster.connect()
    server_pid = cluster.procs[1].pid
    rss = proc_status(server_pid, "VmRSS")
    attacker = hostile_connection(kv._links[0].address)
    try:
        attacker.send(protocol.pack(Op.SET_STATES, length=1 << 30), None)
        assert closed_by_peer(attacker, 5), "the server waited for the payload of SET_STATES before CONNECT"
    finally:
        attacker.close()
    grown = proc_status(server_pid, "VmRSS") - rss
    assert grown < 64 * MiB, f"the server grew by {grown >> 20} MiB for one header"

    attacker = hostile_connection((cluster.host, cluster.port))
    try:
        attacker.send(protocol.pack(Op.BARRIER, length=protocol.MAX_CONTROL_BYTES), None)
        assert closed_by_peer(attacker, 5), "the scheduler waited for a 1 MiB payload before HELLO"
    finally:
        attacker.close()
    assert kv.pushpull("after", np.arange(5, dtype=np.int64)).tolist() == list(range(5))


def test_optimizer_state_is_bounded_by_what_was_declared(cluster_factory):
    """Item 3 after CONNECT: SET_STATES may carry at most protocol.state_limit of
    the bytes declared on the server; the worker checks it before sending."""
    cluster = cluster_factory(1, 1, RDMAKV_TIMEOUT=10)
    kv, = cluster.connect()
    kv.declare("w", (1000,), np.float32)
    limit = protocol.state_limit(4000, 1)
    with pytest.raises(ValueError, match=f"the {limit} its 1 declared chunks allow"):
        kv.server_optimizer.load_states([bytes(limit + 1)])
    server_pid = cluster.procs[1].pid
    rss = proc_status(server_pid, "VmRSS")
    connection = kv._links[0].connection       # a hostile worker skips that check
    connection.send(protocol.pack(Op.SET_STATES, length=1 << 30), None)
    deadline = time.monotonic() + 10
    while kv._links[0].error is None:
        assert time.monotonic() < deadline, "the server waited for 1 GiB of optimizer state"
        time.sleep(0.05)
    grown = proc_status(server_pid, "VmRSS") - rss
    assert grown < 64 * MiB, f"the server grew by {grown >> 20} MiB for one SET_STATES header"
    assert any("optimizer state of 1073741824 bytes exceeds" in line for line in cluster.logs[1]), \
        list(cluster.logs[1])[-5:]


def test_a_declaration_beyond_the_budget_is_refused_and_takes_nothing(cluster_factory):
    """Item 4: one small DECLARE of 1,024 chunks of 1 GiB (a 1 TiB tensor)
    used to open 4,096 descriptors and reserve 2 TiB, never freed.  It is
    refused on every worker, naming the budget, and the server keeps serving."""
    # One malloc arena: glibc reserves 64 MiB of address space for each thread that first
    # allocates, and which of the server's threads do so inside the measured window is timing
    # (the measure is of what the declaration takes, not of thread start-up).
    cluster = cluster_factory(2, 1, RDMAKV_TIMEOUT=10, RDMAKV_SERVER_MEMORY="8G", MALLOC_ARENA_MAX=1)
    kvs = stores(cluster, {}, {"partition_bytes": 1 << 30})
    server_pid = cluster.procs[1].pid
    before = fd_count(server_pid), proc_status(server_pid, "VmSize"), proc_status(server_pid, "VmRSS")
    for kv in kvs:
        kv.declare("huge", (1 << 38,), np.float32)    # 1 TiB, in 1 GiB chunks on worker 1
    errors = [wait_refused(kv, "huge") for kv in kvs]
    for error in errors:
        assert isinstance(error, RemoteError) and "RDMAKV_SERVER_MEMORY" in str(error), error
    time.sleep(0.5)
    after = fd_count(server_pid), proc_status(server_pid, "VmSize"), proc_status(server_pid, "VmRSS")
    assert after[0] <= before[0] + 2, f"descriptors {before[0]} -> {after[0]}"
    assert after[1] - before[1] < 256 * MiB, f"address space grew by {(after[1] - before[1]) >> 20} MiB"
    assert after[2] - before[2] < 64 * MiB, f"RSS grew by {(after[2] - before[2]) >> 20} MiB"
    # A key within the budget still works, summed exactly.
    results = cluster.run(lambda kv: kv.pushpull("small", np.full(3000, kv.rank + 1, np.int32)))
    assert all(r.tolist() == [3] * 3000 for r in results)
    print(f"\nFIGURE 1 TiB declaration: server fds {before[0]} -> {after[0]}, VmSize +{(after[1] - before[1]) >> 20} "
          f"MiB, RSS +{(after[2] - before[2]) >> 20} MiB; refused with: {errors[0]}")


def test_many_small_keys_stay_within_the_budget(cluster_factory):
    """Item 4: 200,000 tiny keys used to add 675 MB to a server.  Declarations
    stop fitting once the budget is spent: the server's growth stays within
    it, keys declared before keep working, later ones are refused naming it."""
    budget = 24 * MiB
    cluster = cluster_factory(2, 1, RDMAKV_TIMEOUT=10, RDMAKV_SERVER_MEMORY=str(budget))
    kvs = cluster.connect()
    results = cluster.run(lambda kv: kv.pushpull("w", np.full(1000, kv.rank + 1, np.int64)))
    assert all(r.tolist() == [3] * 1000 for r in results)
    server_pid = cluster.procs[1].pid
    rss = proc_status(server_pid, "VmRSS")
    attacker = kvs[1]
    count = 30000
    started = time.monotonic()
    for i in range(count):
        attacker.declare(f"k{i}", (1,), np.float32)
    error = wait_refused(attacker, f"k{count - 1}", timeout=60)
    took = time.monotonic() - started
    grown = proc_status(server_pid, "VmRSS") - rss
    assert "RDMAKV_SERVER_MEMORY" in str(error), error
    assert grown < budget + 16 * MiB, f"the server grew by {grown >> 20} MiB with a {budget >> 20} MiB budget"
    refused = sum(attacker._keys[f"k{i}"].error is not None for i in range(count))
    results = cluster.run(lambda kv: kv.pushpull("w", np.full(1000, kv.rank + 1, np.int64)))
    assert all(r.tolist() == [3] * 1000 for r in results)
    print(f"\nFIGURE {count} one-element keys in {took:.1f} s: {count - refused} accepted, {refused} refused; "
          f"server RSS +{grown >> 20} MiB with a {budget >> 20} MiB budget")


def test_declared_buffers_share_few_memory_files(cluster_factory):
    """Item 4: shared-memory round buffers come from a few memory files whose
    sizes double, not one per large chunk: 64 keys of 64 MiB (8 GiB of round
    buffers, declared, never touched) cost the server a handful of descriptors."""
    cluster = cluster_factory(1, 1, RDMAKV_TIMEOUT=10, RDMAKV_SERVER_MEMORY="16G")
    kv, = stores(cluster, {"partition_bytes": 64 * MiB})
    assert type(kv._links[0].connection).__name__ == "ShmConnection"    # round buffers in shared memory
    server_pid = cluster.procs[1].pid
    fds, rss = fd_count(server_pid), proc_status(server_pid, "VmRSS")
    for i in range(64):
        kv.declare(f"big{i}", (16 * MiB,), np.float32)
    assert kv.pushpull("last", np.ones(4, np.float32)).tolist() == [1] * 4     # every declaration is in
    grown_fds, grown_rss = fd_count(server_pid) - fds, proc_status(server_pid, "VmRSS") - rss
    assert grown_fds <= 2 * 10, f"{grown_fds} descriptors for 128 round buffers of 64 MiB"
    assert grown_rss < 64 * MiB, f"RSS grew by {grown_rss >> 20} MiB for buffers nobody touched"
    print(f"\nFIGURE 64 keys x 64 MiB declared: server fds +{grown_fds}, RSS +{grown_rss >> 20} MiB")


def test_a_large_tensor_declares_in_a_message_of_constant_size(cluster_factory):
    """Item 6: a key's declaration no longer grows with its chunks: a 1 GiB
    tensor at 16 KiB partitions (65,536 chunks, a 1.5 MiB chunk list before)
    is declared and summed; a key with more chunks than a key may have is
    refused by declare() itself, naming the key and the limit."""
    cluster = cluster_factory(1, 2, RDMAKV_TIMEOUT=60, RDMAKV_PARTITION_BYTES=16 * 1024)
    kv, = cluster.connect()
    sent = []
    for link in kv._links:
        original = link.send
        link.send = lambda op, payload=None, _send=original, **fields: (
            sent.append(len(payload)) if op == Op.DECLARE else None, _send(op, payload, **fields))[1]
    kv.declare("big", (1 << 28,), np.float32)
    assert len(kv._keys["big"].chunks) == 65536 and max(sent) < 300, sent
    value = np.arange(1 << 24, dtype=np.int32)       # 64 MiB, 4,096 chunks over 2 servers
    assert np.array_equal(kv.pushpull("mid", value, out=np.empty_like(value)), value)
    with pytest.raises(ValueError, match=r"key 'too many'.*at most 262144"):
        kv.declare("too many", (1 << 40,), np.uint8)


def test_the_budget_charges_at_least_what_declarations_cost():
    """KEY_COST and CHUNK_COST, charged per key and per chunk besides the
    buffers, are no less than the Python objects a declaration really keeps."""
    server = ParameterServer(num_servers=1, scheduler_host="127.0.0.1", node_host="127.0.0.1", transport="tcp")
    server.rank, server.num_workers = 0, 2
    try:
        def cost_per_key(count, shape, first):
            tracemalloc.start()
            try:
                for key in range(first, first + count):
                    layout = json.loads(protocol.declaration(key, f"k{key}", "float32", shape, 4))
                    server._validate_layout(key, layout)
                    server._add_key(key, *server._resolve(layout))
                return tracemalloc.get_traced_memory()[0] / count
            finally:
                tracemalloc.stop()

        one_chunk = cost_per_key(2000, [1], 0)
        hundred_chunks = cost_per_key(100, [100], 10000)
        per_chunk = (hundred_chunks - one_chunk) / 99
        assert per_chunk <= CHUNK_COST and one_chunk - per_chunk <= KEY_COST, (one_chunk, per_chunk)
    finally:
        server.close()
    print(f"\nFIGURE bookkeeping: {one_chunk - per_chunk:.0f} bytes per key (charged {KEY_COST}), "
          f"{per_chunk:.0f} per chunk (charged {CHUNK_COST})")


def test_a_push_sent_before_its_key_was_refused_fails_that_key_only(cluster_factory, transport):
    """A worker pushes a key right after declaring it, before the server's
    refusal (it does not fit the budget) can reach it: that push is taken in
    (within what the worker declared) and refused, and the worker stays in the
    job with its other keys (it used to be cut off as having pushed an
    undeclared key, failing the job)."""
    cluster = cluster_factory(2, 1, RDMAKV_TIMEOUT=10, RDMAKV_SERVER_MEMORY=str(MiB))

    def work(kv):
        too_big = kv.pushpull_async("too big", np.ones(MiB, np.float32))     # 4 MiB, pushed at once
        with pytest.raises(RemoteError, match="RDMAKV_SERVER_MEMORY"):
            too_big.wait()
        return kv.pushpull("small", np.full(100, kv.rank + 1, np.int32)).tolist()

    assert cluster.run(work, timeout=60) == [[3] * 100] * 2
