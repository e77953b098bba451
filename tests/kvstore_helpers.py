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
