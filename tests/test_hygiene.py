"""Resource hygiene of a worker over many pushpull rounds, read from /proc:
descriptors, threads and RSS stay flat after warm-up; close() gives back every
descriptor and thread; a process that forks after init keeps working."""
import os
import threading
import time

import numpy as np
import pytest

import rdmakv


def fds():
    return len(os.listdir("/proc/self/fd"))


def tasks():
    return len(os.listdir("/proc/self/task"))


def rss_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def snapshot():
    return {"fds": fds(), "threads": threading.active_count(), "tasks": tasks(), "rss_kib": rss_kib()}


def settle(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def soak(cluster_factory, rounds):
    cluster = cluster_factory(1, 1, RDMAKV_PARTITION_BYTES=4096)
    before = snapshot()
    kv = rdmakv.KVStore(**cluster.settings(worker_id=0))
    small = np.arange(3000, dtype=np.float32)          # 3 chunks
    scalar = np.zeros((), np.int64)
    out = np.empty_like(small)
    warm = max(500, rounds // 10)
    began = time.monotonic()
    for round_ in range(rounds):
        if round_ == warm:
            warmed = snapshot()
        assert kv.pushpull("w", small, out=out) is out
        assert out[2999] == 2999
        scalar[()] = round_
        kv.pushpull("s", scalar)
        assert scalar == round_
    took = time.monotonic() - began
    end = snapshot()
    kv.close()
    assert settle(lambda: fds() <= before["fds"] and threading.active_count() <= before["threads"]), (
        f"close() left descriptors or threads: before {before}, after {snapshot()}")
    closed = snapshot()
    assert end["fds"] == warmed["fds"], (warmed, end)
    assert end["threads"] == warmed["threads"] and end["tasks"] == warmed["tasks"], (warmed, end)
    assert end["rss_kib"] - warmed["rss_kib"] < 4096, f"RSS grew by {end['rss_kib'] - warmed['rss_kib']} KiB"
    print(f"\nFIGURE hygiene: {rounds} rounds x 2 keys in {took:.1f} s; before {before}; after warm-up "
          f"{warmed}; at the end {end}; after close {closed}")


@pytest.mark.timeout(150)
def test_resources_flat_over_10000_rounds(cluster_factory):
    soak(cluster_factory, 10_000)      # about 15 s on a busy 2-core machine


@pytest.mark.timeout(120)
def test_fork_after_init(cluster_factory):
    cluster = cluster_factory(1, 1)
    with rdmakv.KVStore(**cluster.settings(worker_id=0)) as kv:
        value = np.arange(10_000, dtype=np.float64)
        kv.pushpull("f", value)
        pid = os.fork()
        if pid == 0:                       # the child: numpy work only, then leave without cleanup
            code = 1
            try:
                matrix = np.arange(10_000, dtype=np.float64).reshape(100, 100)
                code = 0 if np.isclose((matrix @ matrix.T).trace(), np.sum(matrix * matrix)) else 2
            finally:
                os._exit(code)
        for round_ in range(50):           # the parent carries on while the child runs and exits
            value = np.full(10_000, round_, np.float64)
            np.testing.assert_array_equal(kv.pushpull("f", value), np.full(10_000, round_, np.float64))
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        kv.pushpull("f", value)
