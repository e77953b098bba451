"""A worker script for the launcher tests: exact sums of 7 tensors of assorted shapes and
dtypes, and a clear error for a key reused with another shape."""
import numpy as np
import rdmakv

with rdmakv.KVStore() as kv:
    n = kv.num_workers
    rng = np.random.default_rng(0)
    specs = [((), "int64"), ((0,), "float32"), ((5, 7), "float16"), ((300_001,), "int32"),
             ((64, 3, 3, 3), "float64"), ((2, 1_000_000), "float32"), ((999,), "uint8")]
    handles = []
    for index, (shape, dtype) in enumerate(specs):
        base = rng.integers(0, 3, size=shape).astype(dtype)
        value = np.array(base * (kv.rank + 1))   # an array even when 0-d
        handles.append((base, kv.pushpull_async(f"t{index}", value, priority=int(rng.integers(-5, 5)))))
    for base, handle in handles:
        result = handle.wait()
        expected = (base * sum(range(1, n + 1))).astype(base.dtype)
        assert result.dtype == base.dtype and result.shape == base.shape
        np.testing.assert_array_equal(result, expected)
    try:
        kv.pushpull("t1", np.zeros((3,), np.float32))
    except ValueError as exc:
        print("clear error:", exc)
    print(f"OK rank {kv.rank} of {n}")
