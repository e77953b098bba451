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


def push_raw_then_pushpull(setting, payload):
    """A cluster job: worker 0 declares key "w" (100 float32) with compression `setting`
    and sends `payload` as its round-0 push, raw; worker 1 pushpulls and returns the
    RemoteError's words it must meet (rdmakv.core.errors)."""
    import pytest
    from rdmakv.core import protocol
    from rdmakv.core.errors import RemoteError

    def work(kv):
        kv.declare("w", (100,), "float32", compression=setting)
        if kv.rank == 0:
            info = kv._keys["w"]
            kv._links[0].send(protocol.Op.PUSH, payload, dtype=info.dtype_code, key=info.wire, chunk=0, round=0,
                              sender=0)
            return None
        with pytest.raises(RemoteError) as refused:
            kv.pushpull("w", np.ones(100, np.float32))
        return str(refused.value)
    return work
