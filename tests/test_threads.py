"""Several threads sharing one KVStore (issue 11, item 11).  The contract: any
thread may declare and use keys, in any order; a key's chunks are placed by the
key alone, so workers agree whatever order their threads ran in.  A worker
whose layout of a key still differs (another RDMAKV_PARTITION_BYTES) has that
key refused on every worker, and nothing else."""
import random
import threading

import numpy as np
import pytest

import rdmakv
from cluster import run_threads

SERVERS = 3


def expected(key_index, rnd, workers, shape, dtype):
    return sum((np.arange(np.prod(shape), dtype=np.int64).reshape(shape) + 7 * key_index + rnd + rank) % 13
               for rank in range(workers)).astype(dtype)


def value(key_index, rnd, rank, shape, dtype):
    return ((np.arange(np.prod(shape), dtype=np.int64).reshape(shape) + 7 * key_index + rnd + rank) % 13
            ).astype(dtype)


@pytest.mark.timeout(120)
def test_workers_declaring_keys_in_opposite_orders_agree(cluster_factory):
    """Before: keys were placed by declaration order, so this failed with 'workers placed
    key ... on different servers' and then 'PUSH for undeclared key' on every key."""
    cluster = cluster_factory(num_workers=2, num_servers=SERVERS, RDMAKV_TRANSPORT="tcp",
                              RDMAKV_PARTITION_BYTES=8192)
    shapes = [(3000,), (100,), (5000,), (7,), (2500,)]

    def work(kv):
        order = list(range(len(shapes)))
        if kv.rank == 1:
            order.reverse()
        for rnd in range(3):
            handles = {i: kv.pushpull_async(f"k{i}", value(i, rnd, kv.rank, shapes[i], np.int32)) for i in order}
            for i, handle in handles.items():
                assert np.array_equal(handle.wait(), expected(i, rnd, 2, shapes[i], np.int32)), (i, rnd)

    cluster.run(work)


@pytest.mark.timeout(120)
def test_threads_share_one_kvstore(cluster_factory):
    """Each worker runs 4 threads, each with its own keys, started in a random order
    with random pauses: every sum exact, no error."""
    cluster = cluster_factory(num_workers=2, num_servers=SERVERS, RDMAKV_TRANSPORT="tcp",
                              RDMAKV_PARTITION_BYTES=16384)
    threads, keys_per_thread, rounds = 4, 3, 5
    shapes = {(t, k): ((1 + t) * 1000 + k * 3000,) for t in range(threads) for k in range(keys_per_thread)}
    dtypes = [np.float32, np.int64, np.int32, np.float64]

    def thread_work(kv, t, rng):
        for rnd in range(rounds):
            handles = []
            for k in rng.sample(range(keys_per_thread), keys_per_thread):
                index = t * keys_per_thread + k
                threading.Event().wait(rng.random() * 0.01)
                data = value(index, rnd, kv.rank, shapes[t, k], dtypes[t])
                handles.append((index, shapes[t, k], kv.pushpull_async(f"t{t}.k{k}", data, priority=rng.randint(-3, 3))))
            for index, shape, handle in handles:
                assert np.array_equal(handle.wait(), expected(index, rnd, 2, shape, dtypes[t])), (index, rnd)
        return rounds * keys_per_thread

    def work(kv):
        rng = random.Random(kv.rank)
        order = rng.sample(range(threads), threads)
        results, errors = run_threads([lambda t=t: thread_work(kv, t, random.Random(kv.rank * 100 + t))
                                       for t in order])
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]
        return sum(results)

    assert cluster.run(work) == [threads * keys_per_thread * rounds] * 2


@pytest.mark.timeout(120)
def test_a_disagreeing_layout_fails_only_that_key(cluster_factory):
    """Worker 1 splits keys at 8 KiB, worker 0 at 16 KiB: the 64 KiB key is refused on both,
    naming the setting; the connections stay and a small key still sums (before: the
    server dropped worker 1's connection on a 'PUSH for undeclared key', failing everything)."""
    cluster = cluster_factory(num_workers=2, num_servers=2, RDMAKV_TRANSPORT="tcp")
    stores, errors = run_threads([lambda i=i: rdmakv.KVStore(worker_id=i, **cluster.settings(
        partition_bytes=16384 if i == 0 else 8192)) for i in range(2)])
    cluster.stores.extend(s for s in stores if s is not None)
    assert errors == [None, None], errors

    def work(kv):
        with pytest.raises(rdmakv.RemoteError, match="RDMAKV_PARTITION_BYTES") as refused:
            kv.pushpull("big", np.ones(16384, np.float32))
        assert "'big'" in str(refused.value)
        small = kv.pushpull("small", np.full(100, kv.rank + 1, np.int32))
        assert np.array_equal(small, np.full(100, 3, np.int32))

    cluster.run(work)
