"""pushpull, broadcast and barrier on real local clusters (servers in their
own processes, loopback TCP), checked against numpy."""
import array
import json
import os
import time

import numpy as np
import pytest

import rdmakv
from kvstore_helpers import expected_sum, pushpull_keys_at_once, worker_values
from rdmakv.core.errors import PeerTimeout, RemoteError

pytestmark = pytest.mark.usefixtures("transport")   # each test once per transport, named in its id
DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int32", "int64"]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (1000,), (33, 17, 3), (2500, 9)]


@pytest.mark.parametrize("workers,servers", [(1, 1), (2, 1), (3, 2), (4, 3)])
def test_pushpull_every_dtype_and_shape(cluster_factory, workers, servers):
    # 256-byte partitions make most shapes multi-chunk, with sizes not divisible by the chunk size.
    cluster = cluster_factory(workers, servers, RDMAKV_PARTITION_BYTES=256)

    def work(kv):
        for dtype in DTYPES:
            for shape in SHAPES:
                for round_ in range(2):
                    value = worker_values(kv.rank, shape, dtype, round_)
                    result = kv.pushpull(f"{dtype}{shape}", value)
                    assert result is value
                    np.testing.assert_array_equal(value, expected_sum(workers, shape, dtype, round_))
        return True

    assert cluster.run(work, timeout=120) == [True] * workers


def test_many_keys_in_flight_with_out_and_priorities(cluster_factory):
    cluster = cluster_factory(3, 2, RDMAKV_PARTITION_BYTES=4096, RDMAKV_SCHEDULING_CREDIT=2)
    shapes = [(n * 37 % 2000 + 1,) for n in range(60)]

    def work(kv):
        pushpull_keys_at_once(kv, shapes, 3)
        return True

    assert cluster.run(work) == [True] * 3


def test_repeated_async_rounds_of_one_key_are_ordered(cluster_factory):
    cluster = cluster_factory(2, 2, RDMAKV_PARTITION_BYTES=1024)

    def work(kv):
        values = [np.full(3000, kv.rank + 10 * r, np.int32) for r in range(8)]
        handles = [kv.pushpull_async("k", v) for v in values]
        for r, handle in enumerate(handles):
            np.testing.assert_array_equal(handle.wait(), np.full(3000, 1 + 20 * r, np.int32))
        return True

    assert cluster.run(work) == [True, True]


def test_broadcast_and_barrier(cluster_factory):
    cluster = cluster_factory(3, 2, RDMAKV_PARTITION_BYTES=512)

    def work(kv):
        value = np.arange(1000, dtype=np.float64) * (kv.rank + 1)
        out = np.zeros_like(value)
        kv.broadcast("w", value, out=out, root=2)
        np.testing.assert_array_equal(out, np.arange(1000) * 3.0)
        mine = np.full(4, kv.rank, np.int64)
        kv.broadcast(5, mine)                       # root 0, into value
        np.testing.assert_array_equal(mine, 0)
        kv.barrier()
        kv.barrier()
        return True

    assert cluster.run(work) == [True] * 3


def test_buffer_protocol_and_dlpack_inputs(cluster_factory):
    cluster = cluster_factory(2, 1)

    class DLPackOnly:
        """An array offering only the DLPack protocol."""
        def __init__(self, array):
            self._array = array

        def __dlpack__(self, stream=None):
            return self._array.__dlpack__()

        def __dlpack_device__(self):
            return self._array.__dlpack_device__()

    def work(kv):
        buf = array.array("i", [kv.rank + 1] * 10)
        kv.pushpull("buffer", buf)
        assert list(buf) == [3] * 10
        raw = bytearray(np.full(8, kv.rank + 2, np.uint8).tobytes())
        kv.pushpull("bytes", raw)
        assert raw == bytearray([5] * 8)
        source = np.full(6, kv.rank + 1.5, np.float32)
        out = np.zeros(6, np.float32)
        kv.pushpull("dlpack", DLPackOnly(source), out=DLPackOnly(out))
        np.testing.assert_array_equal(out, np.full(6, 4.0, np.float32))
        return True

    assert cluster.run(work) == [True, True]


def test_bad_input_is_refused_before_sending(cluster_factory):
    cluster = cluster_factory(1, 1)
    (kv,) = cluster.connect()
    good = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        kv.pushpull("x", good[:, ::2])
    frozen = np.zeros(4, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kv.pushpull("x", frozen)
    with pytest.raises(ValueError, match=r"out of key 'x' is float32\[15\] but value is float32\[4, 4\]"):
        kv.pushpull("x", good, out=np.zeros(15, np.float32))
    with pytest.raises(ValueError, match="out of key .x. is"):
        kv.pushpull("x", good, out=np.zeros((4, 4), np.float64))
    with pytest.raises(ValueError, match="read-only"):
        kv.pushpull("x", good, out=frozen.reshape(2, 2).repeat(2, 0).repeat(2, 1)[:0].reshape(0) if False else
                    np.frombuffer(bytes(64), np.float32).reshape(4, 4))
    with pytest.raises(TypeError, match="dtype complex64"):
        kv.pushpull("x", np.zeros(3, np.complex64))
    with pytest.raises(TypeError, match="dtype bool"):
        kv.pushpull("x", np.zeros(3, bool))
    with pytest.raises(TypeError, match="buffer protocol"):
        kv.pushpull("x", [1.0, 2.0])
    with pytest.raises(TypeError, match=r"dtype >f4 \(not this machine's byte order\) is not summed"):
        kv.declare("big-endian", (3,), ">f4")
    with pytest.raises(TypeError, match="dtype >f4"):
        kv.pushpull("big-endian", np.zeros(3, ">f4"))

    class OnGPU:
        """What torch.cuda and CuPy arrays say through DLPack."""
        def __dlpack__(self, stream=None):
            raise AssertionError("a GPU array must be refused before its memory is touched")

        def __dlpack_device__(self):
            return 2, 1
    with pytest.raises(TypeError, match=r"value of key 'x' is in CUDA memory \(device 1\); .* copy it to the CPU"):
        kv.pushpull("x", OnGPU())
    with pytest.raises(TypeError, match="keys are str or int"):
        kv.pushpull(1.5, good)
    with pytest.raises(ValueError, match="priority"):
        kv.pushpull("x", good, priority=2**40)
    with pytest.raises(ValueError, match="root"):
        kv.broadcast("x", good, root=1)
    kv.pushpull("x", good)
    with pytest.raises(ValueError, match=r"key 'x' was declared as float32\[4, 4\]"):
        kv.pushpull("x", np.zeros((2, 8), np.float32))
    # the store still works after every refusal
    value = np.ones((4, 4), np.float32)
    kv.pushpull("x", value)
    np.testing.assert_array_equal(value, 1)


def test_a_known_key_is_checked_as_on_its_first_call(cluster_factory):
    """Once a key is declared its calls take a shorter way to the engine: every
    input the first call refuses is refused with the same error, and every one
    it accepts still sums right."""
    cluster = cluster_factory(1, 1)
    (kv,) = cluster.connect()
    good = np.ones((4, 4), np.float32)
    kv.pushpull("x", good)
    kv.pushpull(1, good)
    frozen = np.ones((4, 4), np.float32)
    frozen.flags.writeable = False
    refused = [
        (lambda: kv.pushpull("x", np.zeros((4, 8), np.float32)[:, ::2]), ValueError,
         r"value of key 'x' is not C-contiguous; pass numpy.ascontiguousarray\(value of key 'x'\)"),
        (lambda: kv.pushpull("x", np.asfortranarray(np.ones((4, 4), np.float32))), ValueError, "C-contiguous"),
        (lambda: kv.pushpull("x", good, out=np.zeros((4, 8), np.float32)[:, ::2]), ValueError,
         "out of key 'x' is not C-contiguous"),
        (lambda: kv.pushpull("x", frozen), ValueError, "value of key 'x' is read-only"),
        (lambda: kv.pushpull("x", good, out=frozen), ValueError, "out of key 'x' is read-only"),
        (lambda: kv.pushpull("x", np.ones((4, 4))), ValueError,
         r"key 'x' was declared as float32\[4, 4\], now used with float64\[4, 4\]"),
        (lambda: kv.pushpull("x", good, out=np.ones((4, 4))), ValueError,
         r"out of key 'x' is float64\[4, 4\] but value is float32\[4, 4\]"),
        (lambda: kv.pushpull("x", np.ones((2, 8), np.float32)), ValueError,
         r"key 'x' was declared as float32\[4, 4\], now used with float32\[2, 8\]"),
        (lambda: kv.pushpull("x", np.ones((4, 4), ">f4")), TypeError, "value of key 'x' has dtype >f4"),
        (lambda: kv.pushpull(True, good), TypeError, "keys are str or int, not bool"),
        (lambda: kv.pushpull(np.int64(1), good), TypeError, "keys are str or int, not int64"),
        (lambda: kv.pushpull(1.0, good), TypeError, "keys are str or int, not float"),
        (lambda: kv.pushpull([1], good), TypeError, "keys are str or int, not list"),
        (lambda: kv.pushpull("x", good, priority=True), ValueError, "priority must be a 32-bit integer"),
        (lambda: kv.pushpull("x", good, priority=2**31), ValueError, "priority must be a 32-bit integer"),
        (lambda: kv.pushpull("y", good), None, None),           # unknown: declared now, and summed
    ]
    for call, error, message in refused:
        if error is None:
            call()
        else:
            with pytest.raises(error, match=message):
                call()
    # accepted by the first call's checks, though not the common case: each still sums right
    unaligned = np.ndarray((4, 4), np.float32, buffer=bytearray(65), offset=1)
    unaligned[...] = 3
    read_only_value = frozen
    out = np.zeros((4, 4), np.float32)
    for value, out, priority in [(unaligned, None, 0), (read_only_value, out, np.int32(-3)),
                                 (good.copy(), np.ndarray((4, 4), np.float32, buffer=bytearray(65), offset=1), 2)]:
        handle = kv.pushpull_async("x", value, out=out, priority=priority)
        result = handle.wait()
        np.testing.assert_array_equal(result, value)
        assert handle.key == "x" and handle.priority == priority and handle.done() and handle.exception() is None
    rounds = [kv.pushpull_async(1, good, out=np.empty_like(good)).round for _ in range(3)]
    assert rounds == [rounds[0], rounds[0] + 1, rounds[0] + 2]


@pytest.mark.parametrize("what", ["shape", "dtype"])
def test_workers_that_disagree_on_a_key_all_get_an_error_naming_it(cluster_factory, what):
    cluster = cluster_factory(2, 2)

    def work(kv):
        if what == "shape":
            value = np.zeros((2, 3) if kv.rank == 0 else (3, 2), np.float32)
        else:
            value = np.zeros(6, np.float32 if kv.rank == 0 else np.int32)
        kv.pushpull("weights", value)

    results, errors = cluster.run_collect(work)
    assert all(isinstance(e, RemoteError) for e in errors), errors
    for error in errors:
        assert "'weights'" in str(error) and what in str(error)

    # other keys keep working on the same cluster
    def other(kv):
        value = np.full(5, kv.rank + 1, np.int64)
        kv.pushpull("other", value)
        return value.tolist()

    assert cluster.run(other) == [[3] * 5] * 2


def test_priority_order_is_observed_at_the_server(cluster_factory, tmp_path):
    # Chunks of 128 KiB take credit (smaller ones go straight out); one may be in flight.
    cluster = cluster_factory(1, 1, RDMAKV_PARTITION_BYTES=128 * 1024, RDMAKV_SCHEDULING_CREDIT=1,
                              RDMAKV_TRACE_DIR=tmp_path)
    (kv,) = cluster.connect()
    low = np.zeros(128 * 1024 * 64 // 4, np.float32)  # 64 chunks
    high = np.ones(1024, np.float32)
    first = kv.pushpull_async("low", low, priority=-10)
    second = kv.pushpull_async("high", high, priority=10)
    second.wait()
    first.wait()
    cluster.close()
    with open(tmp_path / "rdmakv-server-0.json") as trace:
        events = [e["args"] for e in json.load(trace)["traceEvents"] if e.get("name") == "push"]
    order = [e["key"] for e in events]
    assert sorted(order) == ["high"] + ["low"] * 64
    assert order.index("high") < 32, order      # overtook most of the low-priority chunks
    assert all(e["priority"] == (10 if e["key"] == "high" else -10) for e in events)


def test_ipv6_cluster(cluster_factory):
    if not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("this kernel has no IPv6")
    cluster = cluster_factory(2, 2, host="::1", RDMAKV_PARTITION_BYTES=1024)

    def work(kv):
        value = np.arange(5000, dtype=np.int32) * (kv.rank + 1)
        kv.pushpull("v6", value)
        np.testing.assert_array_equal(value, np.arange(5000) * 3)
        return True

    assert cluster.run(work) == [True, True]


def test_unreachable_scheduler_fails_fast_with_its_address():
    from rdmakv.core.netif import free_port
    port = free_port()
    with pytest.raises(PeerTimeout, match=f"127.0.0.1:{port}"):
        rdmakv.KVStore(scheduler_host="127.0.0.1", scheduler_port=port, timeout=1)


def test_wrong_interface_names_the_choices():
    with pytest.raises(rdmakv.ConfigError, match="does not exist; this host has: .*lo"):
        rdmakv.KVStore(interface="nosuch0", timeout=1)


def test_close_is_idempotent_and_later_calls_fail_clearly(cluster_factory):
    cluster = cluster_factory(1, 1)
    (kv,) = cluster.connect()
    kv.pushpull("a", np.ones(3))
    kv.close()
    kv.close()
    with pytest.raises(rdmakv.ClosedError):
        kv.pushpull("a", np.ones(3))
    assert cluster.wait() == [0, 0]


def test_a_round_that_waits_for_a_departed_worker_fails_at_once(cluster_factory):
    cluster = cluster_factory(2, 1, RDMAKV_TIMEOUT=60)
    first, second = cluster.connect()
    both = cluster.run(lambda kv: kv.pushpull("k", np.ones(4)).tolist())
    assert both == [[2.0] * 4] * 2
    first.close()
    started = time.monotonic()
    with pytest.raises(RemoteError, match="worker 0 left the job"):
        second.pushpull("k", np.ones(4))
    assert time.monotonic() - started < 30       # long before RDMAKV_TIMEOUT


def test_timeline_has_every_stage_of_every_chunk(cluster_factory, tmp_path):
    cluster = cluster_factory(2, 2, RDMAKV_PARTITION_BYTES=4096, RDMAKV_TRACE_DIR=tmp_path)

    def work(kv):
        for round_ in range(2):
            kv.pushpull("t", np.ones(3000, np.float32))      # 3 chunks of <= 4 KiB
        return True

    assert cluster.run(work) == [True, True]
    cluster.close()

    def events(name):
        with open(tmp_path / name) as trace:
            data = json.load(trace)
        return [(e["name"], e["args"].get("chunk"), e["args"].get("round"), e["ts"])
                for e in data["traceEvents"] if e.get("ph") == "i"]

    for rank in range(2):
        stages = events(f"rdmakv-worker-{rank}.json")
        for chunk in range(3):
            for round_ in range(2):
                times = {name: ts for name, c, r, ts in stages if c == chunk and r == round_}
                assert set(times) == {"queued", "sent", "received"}
                assert times["queued"] <= times["sent"] <= times["received"]
    summed = [(c, r) for server in range(2) for name, c, r, _ in events(f"rdmakv-server-{server}.json")
              if name == "summed"]
    assert sorted(summed) == sorted((c, r) for c in range(3) for r in range(2))
