"""Load: 8 workers and 3 servers on loopback, random shapes and dtypes, many
operations in flight with random priorities, every result checked exactly
against numpy.  RDMAKV_LOAD_ROUNDS sets the length (the CI default is short;
the figure in docs/reliability.md comes from a longer run)."""
import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("transport")   # each test once per transport, named in its id
DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int32", "int64"]
ROUNDS = int(os.environ.get("RDMAKV_LOAD_ROUNDS", "12"))
KEYS = 40
WORKERS, SERVERS = 8, 3


def specs(seed=1234):
    """The same random (shape, dtype) list on every worker: they must declare alike."""
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(KEYS):
        ndim = int(rng.integers(0, 4))
        shape = tuple(int(d) for d in rng.integers(1, 40 if ndim > 1 else 30_000, size=ndim))
        result.append((shape, DTYPES[int(rng.integers(len(DTYPES)))]))
    return result


def value(rank, round_, key, shape, dtype):
    # Small integers: sums over 8 workers stay exact in float16 and int8.
    rng = np.random.default_rng((rank, round_, key))
    return rng.integers(-1, 2, size=shape).astype(dtype) if dtype != "uint8" else \
        rng.integers(0, 3, size=shape).astype(dtype)


@pytest.mark.timeout(600)
def test_eight_workers_three_servers_random_tensors(cluster_factory):
    cluster = cluster_factory(WORKERS, SERVERS, RDMAKV_PARTITION_BYTES=16384, RDMAKV_SCHEDULING_CREDIT=2)
    table = specs()
    expected = {}
    for round_ in range(ROUNDS):
        for key, (shape, dtype) in enumerate(table):
            expected[round_, key] = sum(value(r, round_, key, shape, dtype).astype(np.int64)
                                        for r in range(WORKERS)).astype(dtype)

    def work(kv):
        rng = np.random.default_rng(kv.rank)
        operations = 0
        for round_ in range(ROUNDS):
            order = rng.permutation(KEYS) if round_ else np.arange(KEYS)   # first use: same order
            handles = []
            for key in order:
                shape, dtype = table[key]
                out = np.empty(shape, dtype)
                handles.append((key, out, kv.pushpull_async(f"load{key}", value(kv.rank, round_, key, shape, dtype),
                                                            out=out, priority=int(rng.integers(-9, 10)))))
            for key, out, handle in handles:
                handle.wait()
                assert np.array_equal(out, expected[round_, key]), f"round {round_} key {key}"
                operations += 1
        return operations

    began = time.monotonic()
    operations = cluster.run(work, timeout=560)
    took = time.monotonic() - began
    total = sum(operations)
    assert total == WORKERS * ROUNDS * KEYS
    nbytes = sum(np.prod(shape, dtype=np.int64) * np.dtype(dtype).itemsize for shape, dtype in table)
    print(f"\nFIGURE load: {WORKERS} workers x {SERVERS} servers, {KEYS} random keys ({nbytes / 2**20:.1f} MiB "
          f"per round), {ROUNDS} rounds: {total} pushpulls, all exact, in {took:.1f} s")
