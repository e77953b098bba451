"""pushpull_many and KVStore.fuse pack small tensors into one message per dtype."""
import numpy as np
import pytest

from kvstore_helpers import expected_sum, worker_values


def test_pushpull_many_sums_small_and_large_tensors_exactly(cluster_factory):
    cluster = cluster_factory(2, 2, RDMAKV_PARTITION_BYTES=64 * 1024)
    shapes = [(1,), (), (5, 3), (0,), (300,), (100_000,), (7, 7)]
    dtypes = ["float32", "int64", "float16", "int32", "float32", "float64", "int8"]

    def work(kv):
        for round_ in range(3):
            values = [worker_values(kv.rank, s, d, round_) for s, d in zip(shapes, dtypes)]
            outs = [np.empty_like(v) for v in values]
            results = kv.pushpull_many([f"p{i}" for i in range(len(values))], values, outs, priority=-round_)
            assert results == outs
            for i, (s, d) in enumerate(zip(shapes, dtypes)):
                np.testing.assert_array_equal(outs[i], expected_sum(2, s, d, round_))
            in_place = [worker_values(kv.rank, s, d, round_) for s, d in zip(shapes, dtypes)]
            kv.pushpull_many(range(100, 100 + len(in_place)), in_place)
            for i, (s, d) in enumerate(zip(shapes, dtypes)):
                np.testing.assert_array_equal(in_place[i], expected_sum(2, s, d, round_))
        return True

    assert cluster.run(work) == [True, True]


def test_pushpull_many_rejects_bad_arguments(cluster_factory):
    cluster = cluster_factory(1, 1)
    (kv,) = cluster.connect()
    with pytest.raises(ValueError, match="do not match"):
        kv.pushpull_many(["a", "b"], [np.ones(2)])
    with pytest.raises(ValueError, match="same key twice"):
        kv.pushpull_many(["a", "a"], [np.ones(2), np.ones(2)])
    with pytest.raises(ValueError, match="out of key 'a'"):
        kv.pushpull_many(["a"], [np.ones(2)], [np.ones(3)])
    with pytest.raises(TypeError, match="dtype complex128"):
        kv.pushpull_many(["a"], [np.ones(2, complex)])


def test_a_fused_group_is_reused_across_steps(cluster_factory):
    cluster = cluster_factory(2, 1)
    shapes = [(256,)] * 300 + [(3, 5), (100_000,)]
    dtypes = ["float32"] * 300 + ["int32", "float32"]

    def work(kv):
        values = [np.empty(s, d) for s, d in zip(shapes, dtypes)]
        outs = [np.empty_like(v) for v in values]
        group = kv.fuse([f"g{i}" for i in range(len(values))], values, outs)
        for step in range(4):
            for value, s, d in zip(values, shapes, dtypes):
                value[...] = worker_values(kv.rank, s, d, step)     # refilled in place, as gradients are
            assert group.pushpull(priority=step) == outs
            for i, (s, d) in enumerate(zip(shapes, dtypes)):
                np.testing.assert_array_equal(outs[i], expected_sum(2, s, d, step))
        return True

    assert cluster.run(work) == [True, True]


def test_pack_and_unpack_check_their_buffers():
    from rdmakv.native import transport as t
    parts = [np.arange(3, dtype=np.int64), np.arange(4, dtype=np.int64) + 100, np.empty(0, np.int64)]
    packed = np.empty(7, np.int64)
    t.pack(parts, packed)
    np.testing.assert_array_equal(packed, [0, 1, 2, 100, 101, 102, 103])
    back = [np.zeros(3, np.int64), np.zeros(4, np.int64), np.zeros(0, np.int64)]
    t.unpack(packed, back)
    for got, want in zip(back, parts):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="hold 56 bytes, the packed buffer 48"):
        t.pack(parts, np.empty(6, np.int64))
    read_only = np.zeros(3, np.int64)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only|not writable"):
        t.unpack(packed[:3], [read_only])
