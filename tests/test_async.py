"""Asynchronous mode (RDMAKV_MODE=async) on real local clusters: each push is
applied as it arrives and answered at once, a stalled worker holds nobody back,
and the stored value ends as the exact sum of every push (checked against numpy)."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import rdmakv
from cluster import run_threads, scaled
from rdmakv.control import auth
from rdmakv.control.node import ControlLink
from rdmakv.core import partition, protocol
from rdmakv.core.config import Config
from rdmakv.core.errors import RemoteError
from rdmakv.core.protocol import Op
from rdmakv.transport import tcp
from rdmakv.worker.keys import wire_key

pytestmark = pytest.mark.usefixtures("transport")   # each test once per transport, named in its id

ELEMENTS = 5000                   # int64: 40,000 bytes, three chunks over two servers
PARTITION = 16384


@pytest.fixture(params=["native", "python"])
def async_cluster(request, cluster_factory, monkeypatch):
    """make(workers, servers) -> a started LocalCluster whose servers and in-process workers
    run async, on the native data plane and on the Python one (named in the test id)."""
    monkeypatch.setenv("RDMAKV_MODE", "async")
    monkeypatch.setenv("RDMAKV_ENGINE", request.param)

    def make(workers=2, servers=2, **env):
        return cluster_factory(workers, servers, **{"RDMAKV_PARTITION_BYTES": PARTITION, **env})
    return make


def delta(rank, step):
    """Worker rank's push number step: distinct per worker and step, with negative elements."""
    return (np.arange(ELEMENTS, dtype=np.int64) % 7 - 3) * (rank + 1) + step * 1000 + rank


def test_a_stalled_worker_does_not_hold_back_the_others(async_cluster):
    cluster = async_cluster(2, 2)
    steps = 6
    worker1_pushed, worker0_done = threading.Event(), threading.Event()
    replies = []

    def work(kv):
        if kv.rank == 1:
            np.testing.assert_array_equal(kv.pushpull("w", delta(1, 0)), delta(1, 0))
            worker1_pushed.set()
            # Stalled: in sync mode worker 0's next pushpull would wait for this worker's push.
            assert worker0_done.wait(60), "worker 0's pushpulls did not complete while worker 1 stalled"
            for step in range(1, steps):
                kv.pushpull("w", delta(1, step))
            return
        assert worker1_pushed.wait(60)
        for step in range(steps):
            replies.append(kv.pushpull("w", delta(0, step)).copy())
        worker0_done.set()

    cluster.run(work)
    # Each reply is the stored value right after that push: worker 0's pushes so far and worker 1's first.
    for step, reply in enumerate(replies):
        np.testing.assert_array_equal(reply, sum(delta(0, s) for s in range(step + 1)) + delta(1, 0))

    def final(kv):
        return kv.pushpull("w", np.zeros(ELEMENTS, np.int64))   # a push of zeros: the stored value

    expected = sum(delta(rank, step) for rank in range(2) for step in range(steps))
    for value in cluster.run(final):
        np.testing.assert_array_equal(value, expected)


def test_every_push_is_applied_once_while_workers_race(async_cluster):
    cluster = async_cluster(3, 2)
    steps = 20

    chunk_elements = PARTITION // 8

    def work(kv):
        assert (kv.engine is None) == (os.environ["RDMAKV_ENGINE"] == "python")
        for step in range(steps):
            reply = kv.pushpull("w", np.full(ELEMENTS, 100 ** kv.rank, np.int64))
            # Worker r's pushes count in decimal digits 2r and 2r+1.  The reply follows this
            # worker's own push: it holds all of them so far and some of the others', one
            # copy of the stored value per chunk (the same count in each of its elements).
            counts = [reply // 100 ** rank % 100 for rank in range(3)]
            assert (counts[kv.rank] == step + 1).all(), (kv.rank, step, np.unique(counts[kv.rank]))
            for start in range(0, ELEMENTS, chunk_elements):
                piece = reply[start:start + chunk_elements]
                assert (piece == piece[0]).all() and 0 <= piece[0] <= 20 * 10101
        kv.barrier()
        return kv.pushpull("w", np.zeros(ELEMENTS, np.int64))

    expected = np.full(ELEMENTS, sum(steps * 100 ** rank for rank in range(3)), np.int64)
    for value in cluster.run(work):
        np.testing.assert_array_equal(value, expected)


def test_the_stored_value_starts_at_init_or_at_a_broadcast(async_cluster):
    cluster = async_cluster(2, 1)
    start = np.arange(ELEMENTS, dtype=np.int32) - 77
    root = np.arange(ELEMENTS, dtype=np.int32) * 3

    def work(kv):
        kv.init("initialized", start if kv.rank == 0 else np.zeros(ELEMENTS, np.int32))
        kv.barrier()                  # as MXNet's init does: the starting value is in before any push
        # Rank 0's copy: its result lands in what it passes, which the other worker thread reads.
        got = kv.broadcast("broadcast", root.copy() if kv.rank == 0 else np.zeros(ELEMENTS, np.int32))
        np.testing.assert_array_equal(got, root)
        for step in range(5):
            kv.pushpull("initialized", np.full(ELEMENTS, kv.rank + 1, np.int32))
            kv.pushpull("broadcast", np.full(ELEMENTS, step, np.int32))
        kv.barrier()
        return (kv.pushpull("initialized", np.zeros(ELEMENTS, np.int32)),
                kv.pushpull("broadcast", np.zeros(ELEMENTS, np.int32)))

    for initialized, broadcast in cluster.run(work):
        np.testing.assert_array_equal(initialized, start + 5 * (1 + 2))
        np.testing.assert_array_equal(broadcast, root + 2 * sum(range(5)))


def test_workers_and_servers_must_agree_on_the_mode(cluster_factory):
    cluster = cluster_factory(2, 1, RDMAKV_MODE="async")     # the servers; the workers stay sync
    stores, errors = run_threads([lambda i=i: rdmakv.KVStore(worker_id=i, mode="sync", **cluster.settings())
                                  for i in range(2)])
    for store in stores:
        if store is not None:
            store.close()
    for error in errors:
        assert isinstance(error, RemoteError), error
        message = str(error)
        assert "RDMAKV_MODE" in message and "server 0 async" in message and "worker 0, worker 1 sync" in message
    assert cluster.wait() == [1, 1]


def test_a_worker_that_leaves_early_does_not_stop_the_others(async_cluster):
    cluster = async_cluster(2, 1)
    left = threading.Event()

    def work(kv):
        if kv.rank == 0:
            for step in range(3):
                kv.pushpull("w", delta(0, step))
            kv.close()                # in sync mode the other worker's rounds could no longer complete
            left.set()
            return None
        assert left.wait(60)
        replies = [kv.pushpull("w", delta(1, step)).copy() for step in range(4)]
        return replies

    _, replies = cluster.run(work)
    early = sum(delta(0, step) for step in range(3))
    for step, reply in enumerate(replies):
        np.testing.assert_array_equal(reply, early + sum(delta(1, s) for s in range(step + 1)))


@pytest.mark.mxnet
def test_the_server_optimizer_applies_each_push_as_it_arrives(async_cluster):
    mx = pytest.importorskip("mxnet")
    from rdmakv.mxnet import optimizer as server_optimizers
    cluster = async_cluster(2, 2)
    start = (np.arange(ELEMENTS) % 13).astype(np.float32)
    worker1_pushed, worker0_done = threading.Event(), threading.Event()
    steps = 4
    replies = []

    def grad(rank, step):             # SGD at a rate of 1/2 on small integers: exact in float32
        return ((np.arange(ELEMENTS) % 5 - 2) * (rank + 1) + step).astype(np.float32)

    def work(kv):
        kv.server_optimizer.set(server_optimizers.describe(mx.optimizer.SGD(learning_rate=0.5)))
        kv.init("w", start if kv.rank == 0 else np.zeros(ELEMENTS, np.float32))
        kv.barrier()
        if kv.rank == 1:
            np.testing.assert_array_equal(kv.pushpull("w", grad(1, 0)), start - 0.5 * grad(1, 0))
            worker1_pushed.set()
            assert worker0_done.wait(60), "worker 0's pushpulls did not complete while worker 1 stalled"
            for step in range(1, steps):
                kv.pushpull("w", grad(1, step))
        else:
            assert worker1_pushed.wait(60)
            for step in range(steps):
                replies.append(kv.pushpull("w", grad(0, step)).copy())
            worker0_done.set()
        kv.barrier()
        return kv.pushpull("w", np.zeros(ELEMENTS, np.float32))   # a zero gradient: SGD leaves the weight

    finals = cluster.run(work)
    for step, reply in enumerate(replies):
        np.testing.assert_array_equal(reply, start - 0.5 * (grad(1, 0) + sum(grad(0, s) for s in range(step + 1))))
    expected = start - 0.5 * sum(grad(rank, step) for rank in range(2) for step in range(steps))
    for final in finals:
        np.testing.assert_array_equal(final, expected)


WORKER_SCRIPT = """
import sys, numpy as np, rdmakv
kv = rdmakv.KVStore()
for step in range(6):
    kv.pushpull("w", np.full(5000, 1000, np.int64))
    print("pushed", step, flush=True)
    if step == 0:
        sys.stdin.readline()
kv.barrier()
print("final", int(kv.pushpull("w", np.zeros(5000, np.int64))[0]), flush=True)
kv.close()
"""


def test_a_worker_process_stopped_by_sigstop_holds_nobody_back(async_cluster):
    cluster = async_cluster(2, 2)
    env = dict(cluster.env, DMLC_ROLE="worker", DMLC_WORKER_ID="1")
    child = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        kv = rdmakv.KVStore(worker_id=0, **cluster.settings())
        cluster.stores.append(kv)
        assert child.stdout.readline() == "pushed 0\n"
        os.kill(child.pid, signal.SIGSTOP)    # every thread of worker 1, its engine's and heartbeats too
        try:
            replies = [kv.pushpull("w", np.ones(5000, np.int64))[0] for _ in range(10)]
        finally:
            os.kill(child.pid, signal.SIGCONT)
        assert replies == [1000 + step + 1 for step in range(10)]
        child.stdin.write("go\n")
        child.stdin.flush()
        kv.barrier()
        final = kv.pushpull("w", np.zeros(5000, np.int64))
        np.testing.assert_array_equal(final, np.full(5000, 6 * 1000 + 10, np.int64))
        out, _ = child.communicate(timeout=30)
        assert out.splitlines()[-1] == "final 6010" and child.returncode == 0, out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "uint8", "int32", "int64"])
def test_every_dtype_and_an_empty_key(async_cluster, dtype):
    cluster = async_cluster(2, 2)
    shapes = [(0,), (7,), (3000, 3)]          # the last in several chunks

    def value(rank, shape):
        return (np.arange(int(np.prod(shape))).reshape(shape) % 5 + rank + 1).astype(dtype)

    def work(kv):
        for _ in range(3):
            for shape in shapes:
                kv.pushpull(f"k{shape}", value(kv.rank, shape))
        kv.barrier()
        return [kv.pushpull(f"k{shape}", np.zeros(shape, dtype)) for shape in shapes]

    for finals in cluster.run(work):
        for shape, final in zip(shapes, finals):
            expected = sum(value(rank, shape) for rank in range(2) for _ in range(3)).astype(dtype)
            np.testing.assert_array_equal(final, expected)


def test_a_stalled_broadcast_names_the_workers_that_have_not_sent_their_part(async_cluster):
    """Each server tells the workers waiting on a broadcast, by their own rounds (a
    worker's rounds are its own in asynchronous mode), who has not sent a part."""
    cluster = async_cluster(3, 2, RDMAKV_TIMEOUT=scaled(5))   # as tests/test_liveness.py: short, with room to join
    done = threading.Event()

    def work(kv):
        if kv.rank == 2:              # alive and heartbeating, but no part of the broadcast
            done.wait(60)
            return None
        try:
            for step in range(kv.rank + 1):   # rank 0 and 1 reach the broadcast at different rounds
                kv.pushpull("b", delta(kv.rank, step))
            kv.broadcast("b", delta(0, 0))
        finally:
            if kv.rank == 0:
                done.set()

    _, errors = cluster.run_collect(work)
    for rank in (0, 1):
        error = errors[rank]
        assert isinstance(error, rdmakv.PeerTimeout), error
        message = str(error)
        assert message.count("it has not received the push of worker 2 for this round") == 2, message
        assert "worker 0" not in message and "worker 1" not in message, message


HOSTILE_ELEMENTS = 1 << 17        # int64: one chunk of 1 MiB, on the one server


def join_as_worker(cluster, rank):
    """A raw peer takes worker rank's place: it joins through the scheduler (rdmakv's own
    ControlLink, which heartbeats) and opens an authenticated TCP connection to the server,
    over which it says what it likes (its sends wait for 4 x RDMAKV_TIMEOUT, so that it is
    the server that gives up first).  Returns (control link, data connection)."""
    config = Config.load(role="worker", **cluster.settings())
    control = ControlLink(config, tcp, "worker", lambda header, obj: None, lambda error: None)
    (host, port), = control.join("127.0.0.1", 0, rank)["servers"]
    connection = auth.open_connection(tcp, host, port, None, 4 * config.timeout)
    connection.send(protocol.pack(Op.CONNECT, length=len(hello := protocol.encode_json({"rank": rank}))), hello)
    return control, connection


def next_message(connection, op, timeout):
    """The next message of op on a raw peer's connection (header, payload), past any other."""
    while True:
        header = connection.recv_header(timeout)
        payload = bytearray(header.length)
        if header.length:
            connection.recv_payload(header, payload)
        if header.op == op:
            return header, payload


def server_rss(cluster):
    with open(f"/proc/{cluster.procs[1].pid}/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmRSS:"))


@pytest.mark.timeout(120)
def test_a_worker_that_does_not_read_its_replies_holds_one_per_chunk_and_nobody_back(async_cluster):
    """A peer that pushes round after round and reads no reply: the server takes its next push
    of a chunk only once the reply to the last one left, so it holds one reply per chunk for it
    (not one per push), each reply is still the value right after its own push, the other
    worker goes on meanwhile, and a peer that never reads is cut off after RDMAKV_TIMEOUT."""
    if os.environ["RDMAKV_TRANSPORT"] != "tcp":
        pytest.skip("the raw peer speaks TCP")
    timeout = 8
    cluster = async_cluster(2, 1, RDMAKV_TIMEOUT=timeout, RDMAKV_PARTITION_BYTES=HOSTILE_ELEMENTS * 8)
    (kv, joined), errors = run_threads([lambda: rdmakv.KVStore(worker_id=0, **cluster.settings()),
                                        lambda: join_as_worker(cluster, 1)])
    assert errors == [None, None], errors
    cluster.stores.append(kv)
    control, connection = joined
    nbytes = HOSTILE_ELEMENTS * 8
    wire = wire_key("h")
    layout = protocol.declaration(wire, "h", "int64", (HOSTILE_ELEMENTS,),
                                  partition.chunk_size(nbytes, 8, cluster.settings()["partition_bytes"]))
    connection.send(protocol.pack(Op.DECLARE, length=len(layout)), layout)
    ones = np.ones(HOSTILE_ELEMENTS, np.int64)
    step = np.ones(8, np.int64)       # worker 0's pushpulls: a small key of its own
    kv.pushpull("w", step.copy())     # the server runs; its memory from here on is what the peer costs
    rss = server_rss(cluster)
    pushes = 120                      # 120 MiB: a reply copy kept per push would show
    sent, cut_off = [], []

    def push(rounds):
        try:
            for rnd in rounds:
                connection.send(protocol.pack(Op.PUSH, key=wire, chunk=0, round=rnd, length=nbytes,
                                              dtype=protocol.DTYPE_CODES["int64"]), ones)
                sent.append(rnd)
        except rdmakv.RdmaKVError as exc:
            cut_off.append(exc)

    pusher = threading.Thread(target=push, args=(range(pushes),), daemon=True)
    pusher.start()
    while pusher.is_alive():          # until its pushes are all in, or the server stops taking them
        count = len(sent)
        pusher.join(1.0)
        if len(sent) == count:
            break
    grown, stalled_at = server_rss(cluster) - rss, len(sent)
    replies = [kv.pushpull("w", step.copy())[0] for _ in range(5)]    # not held back meanwhile
    assert replies == [2 + step for step in range(5)]
    for rnd in range(pushes):         # now read: each reply is the value right after its push
        header, payload = next_message(connection, Op.RESULT, 4 * timeout)
        reply = np.frombuffer(payload, np.int64)
        assert header.round == rnd and (reply == rnd + 1).all(), (rnd, header.round, np.unique(reply))
    pusher.join(timeout)
    assert not pusher.is_alive()
    assert grown < 32 << 20, f"the server grew by {grown >> 20} MiB holding replies the peer did not read"
    # A peer that never reads: its link is closed after RDMAKV_TIMEOUT, naming why: by its
    # reader, the next push having waited that long for the reply before it to leave, or by
    # its reply thread, that reply's send having made no progress that long (both wait, and
    # which gives up first is timing).
    assert not cut_off, cut_off
    pusher = threading.Thread(target=push, args=(range(pushes, 2 * pushes),), daemon=True)
    pusher.start()
    pusher.join(5 * timeout)
    assert cut_off, "the server kept taking pushes from a peer that reads no reply"
    reasons = ("worker 1 pushed key 'h' chunk 0 again but left the reply to its previous push unread for "
               f"{timeout:g} s (RDMAKV_TIMEOUT)", f"no progress for {timeout:g} s (RDMAKV_TIMEOUT)")
    deadline = time.monotonic() + timeout
    while not (why := [line for line in cluster.logs[1] if "worker 1" in line and any(r in line for r in reasons)]):
        assert time.monotonic() < deadline, (cut_off, list(cluster.logs[1]))
        time.sleep(0.1)
    assert kv.pushpull("w", step.copy())[0] == 7
    print(f"\nFIGURE a peer that does not read: server RSS +{grown >> 20} MiB when the peer had sent "
          f"{stalled_at} pushes of 1 MiB; then: {why[0]}")
    connection.close()
    control.close()


def test_a_pushpull_before_the_workers_own_broadcast_completed_is_refused(async_cluster):
    """A worker's broadcast reply is written, for every worker, by whichever worker's part
    comes last: one that pushpulls the key before its own broadcast of it completed (which no
    KVStore does, its rounds of a key being in order) gets the key refused, naming why."""
    if os.environ["RDMAKV_TRANSPORT"] != "tcp":
        pytest.skip("the raw peer speaks TCP")
    cluster = async_cluster(2, 1)
    (kv, joined), errors = run_threads([lambda: rdmakv.KVStore(worker_id=0, **cluster.settings()),
                                        lambda: join_as_worker(cluster, 1)])
    assert errors == [None, None], errors
    cluster.stores.append(kv)
    control, connection = joined
    wire, value = wire_key("c"), np.arange(4, dtype=np.int32)
    layout = protocol.declaration(wire, "c", "int32", (4,), 16)
    connection.send(protocol.pack(Op.DECLARE, length=len(layout)), layout)
    code = protocol.DTYPE_CODES["int32"]
    connection.send(protocol.pack(Op.PUSH, key=wire, chunk=0, round=0, dtype=code, flags=protocol.FLAG_BROADCAST,
                                  length=16), value)
    connection.send(protocol.pack(Op.PUSH, key=wire, chunk=0, round=1, dtype=code, length=16), value)
    _, payload = next_message(connection, Op.ERROR, 10)
    message = protocol.decode_json(bytes(payload))["message"]
    assert message == "worker 1 pushpulled key 'c' before its broadcast of that key completed", message
    connection.close()
    control.close()
