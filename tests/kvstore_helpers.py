"""Deterministic test data shared by the cluster tests."""
import numpy as np


def worker_values(rank, shape, dtype, round_=0):
    """Deterministic per-worker data: small integers, so float sums are exact too."""
    rng = np.random.default_rng(1000 * rank + round_ + 17 * len(shape))
    return rng.integers(-3, 4, size=shape).astype(dtype)


def expected_sum(num_workers, shape, dtype, round_=0):
    total = np.zeros(shape, dtype)
    for rank in range(num_workers):
        total += worker_values(rank, shape, dtype, round_)
    return total


def pushpull_keys_at_once(kv, shapes, num_workers):
    """Start an int64 pushpull with `out` for every shape (key = index,
    priority = -index) before waiting on any, then check each sum exactly."""
    handles = []
    for index, shape in enumerate(shapes):
        value = worker_values(kv.rank, shape, "int64", index)
        out = np.empty_like(value)
        handles.append((index, out, kv.pushpull_async(index, value, out=out, priority=-index)))
    for index, out, handle in handles:
        assert handle.wait() is out
        np.testing.assert_array_equal(out, expected_sum(num_workers, shapes[index], "int64", index))
