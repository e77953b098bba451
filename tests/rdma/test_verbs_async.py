"""Asynchronous mode (RDMAKV_MODE=async) over verbs in the soft-RoCE VM, on both data
paths: tests/test_async.py's core cases (every push applied once while workers race, the
stored value starting at init or a broadcast, a stalled worker holding nobody back)."""
import threading

import numpy as np
import pytest

from rdmakv.transport.verbs import devices as verbs_devices

USABLE, REASON = verbs_devices.probe()
pytestmark = [pytest.mark.rdma, pytest.mark.skipif(not USABLE, reason=f"no usable RDMA device: {REASON}")]

ELEMENTS = 5000                   # int64: 40,000 bytes, three chunks over two servers
PARTITION = 16384


@pytest.fixture(params=["native", "python"])
def async_verbs_cluster(request, cluster_factory, monkeypatch):
    monkeypatch.setenv("RDMAKV_TRANSPORT", "verbs")
    monkeypatch.setenv("RDMAKV_ENGINE", request.param)
    monkeypatch.setenv("RDMAKV_MODE", "async")

    def make(workers, servers):
        # Python under TCG starts slowly: give the rendezvous more than the default 30 s.
        cluster = cluster_factory(workers, servers, RDMAKV_TIMEOUT=120, RDMAKV_PARTITION_BYTES=PARTITION)
        cluster.connect()
        for kv in cluster.stores:
            from rdmakv.transport import verbs
            assert kv.transport is verbs and (kv._engine is not None) == (request.param == "native")
        return cluster
    return make


def delta(rank, step):
    return (np.arange(ELEMENTS, dtype=np.int64) % 7 - 3) * (rank + 1) + step * 1000 + rank


def test_every_push_is_applied_once_while_workers_race(async_verbs_cluster):
    cluster = async_verbs_cluster(2, 2)
    steps = 10

    def work(kv):
        for step in range(steps):
            reply = kv.pushpull("w", np.full(ELEMENTS, 100 ** kv.rank, np.int64))
            # The reply follows this worker's own push: all of its pushes so far are in.
            assert (reply // 100 ** kv.rank % 100 == step + 1).all(), (kv.rank, step)
        kv.barrier()
        return kv.pushpull("w", np.zeros(ELEMENTS, np.int64))

    for value in cluster.run(work, timeout=240):
        np.testing.assert_array_equal(value, np.full(ELEMENTS, steps * 101, np.int64))


def test_the_stored_value_starts_at_init_or_at_a_broadcast(async_verbs_cluster):
    cluster = async_verbs_cluster(2, 2)
    start = np.arange(ELEMENTS, dtype=np.int32) - 77
    root = np.arange(ELEMENTS, dtype=np.int32) * 3

    def work(kv):
        kv.init("initialized", start if kv.rank == 0 else np.zeros(ELEMENTS, np.int32))
        kv.barrier()
        got = kv.broadcast("broadcast", root.copy() if kv.rank == 0 else np.zeros(ELEMENTS, np.int32))
        np.testing.assert_array_equal(got, root)
        for step in range(3):
            kv.pushpull("initialized", np.full(ELEMENTS, kv.rank + 1, np.int32))
            kv.pushpull("broadcast", np.full(ELEMENTS, step, np.int32))
        kv.barrier()
        return (kv.pushpull("initialized", np.zeros(ELEMENTS, np.int32)),
                kv.pushpull("broadcast", np.zeros(ELEMENTS, np.int32)))

    for initialized, broadcast in cluster.run(work, timeout=240):
        np.testing.assert_array_equal(initialized, start + 3 * (1 + 2))
        np.testing.assert_array_equal(broadcast, root + 2 * sum(range(3)))


def test_a_stalled_worker_does_not_hold_back_the_others(async_verbs_cluster):
    cluster = async_verbs_cluster(2, 2)
    steps = 4
    worker1_pushed, worker0_done = threading.Event(), threading.Event()
    replies = []

    def work(kv):
        if kv.rank == 1:
            np.testing.assert_array_equal(kv.pushpull("w", delta(1, 0)), delta(1, 0))
            worker1_pushed.set()
            assert worker0_done.wait(200), "worker 0's pushpulls did not complete while worker 1 stalled"
            for step in range(1, steps):
                kv.pushpull("w", delta(1, step))
        else:
            assert worker1_pushed.wait(200)
            for step in range(steps):
                replies.append(kv.pushpull("w", delta(0, step)).copy())
            worker0_done.set()
        kv.barrier()
        return kv.pushpull("w", np.zeros(ELEMENTS, np.int64))

    finals = cluster.run(work, timeout=240)
    for step, reply in enumerate(replies):
        np.testing.assert_array_equal(reply, sum(delta(0, s) for s in range(step + 1)) + delta(1, 0))
    expected = sum(delta(rank, step) for rank in range(2) for step in range(steps))
    for final in finals:
        np.testing.assert_array_equal(final, expected)
