"""Gradient compression on real local clusters (rdmakv/core/compression.py,
rdmakv/native/codec.c): each round's sums are exactly what numpy's own decoders
(tests/codec_reference.py) make of the encodings each worker pushed, on both
data paths and every transport; and what crosses the wire is the encoding."""
import re

import numpy as np
import pytest


import codec_reference as ref
from kvstore_helpers import push_raw_then_pushpull
import rdmakv
from rdmakv.core import protocol
from rdmakv.core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("transport")   # each test once per transport, named in its id

ELEMENTS = 5000                   # 20,000 float32 bytes: two chunks of 16 KiB and less, over two servers
PARTITION = 16384
ROUNDS = 3
THRESHOLD = 0.5


@pytest.fixture(params=["native", "python"])
def engine(request, monkeypatch):
    monkeypatch.setenv("RDMAKV_ENGINE", request.param)
    return request.param


def gradient(rank, step, count=ELEMENTS):
    """Worker rank's gradient of round step: spread around +-threshold, so each round quantizes some."""
    rng = np.random.default_rng(100 * rank + step)
    return (rng.standard_normal(count) * 0.6).astype(np.float32)


def chunk_bounds(count, partition=PARTITION):
    step = partition // 4
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def test_2bit_sums_are_numpys_decoding_of_every_workers_encoding(cluster_factory, engine):
    cluster = cluster_factory(2, 2, RDMAKV_PARTITION_BYTES=PARTITION)

    def work(kv):
        assert (kv.engine is None) == (engine == "python")
        kv.declare("w", (ELEMENTS,), "float32", compression={"type": "2bit", "threshold": THRESHOLD})
        return [kv.pushpull("w", gradient(kv.rank, step)).copy() for step in range(ROUNDS)]

    results = cluster.run(work)
    residuals = [np.zeros(ELEMENTS, np.float32) for _ in range(2)]
    for step in range(ROUNDS):
        expected = np.zeros(ELEMENTS, np.float32)
        for rank in range(2):
            # Each chunk is encoded alone (its own 16-value blocks), as the workers do.
            for start, end in chunk_bounds(ELEMENTS):
                data, residuals[rank][start:end] = ref.twobit_encode(
                    gradient(rank, step)[start:end], residuals[rank][start:end], THRESHOLD)
                expected[start:end] += ref.twobit_decode(data, end - start, THRESHOLD)
        for result in results:
            np.testing.assert_array_equal(result[step], expected)
        assert np.count_nonzero(expected) > ELEMENTS // 4


def test_fp16_sums_the_halves_and_pulls_the_sum_as_a_half(cluster_factory, engine):
    cluster = cluster_factory(2, 2, RDMAKV_PARTITION_BYTES=PARTITION)

    def work(kv):
        kv.set_compression("fp16")
        assert kv.pushpull("empty", np.zeros(0, np.float32)).shape == (0,)   # an empty key's one empty chunk
        return [kv.pushpull("w", gradient(kv.rank, step)).copy() for step in range(ROUNDS)]

    results = cluster.run(work)
    for step in range(ROUNDS):
        summed = sum(ref.fp16_decode(ref.fp16_encode(gradient(rank, step))) for rank in range(2))
        expected = ref.fp16_decode(ref.fp16_encode(summed))
        for result in results:
            np.testing.assert_array_equal(result[step], expected)


def test_a_broadcast_of_a_compressed_key_goes_whole(cluster_factory, engine):
    cluster = cluster_factory(2, 1, RDMAKV_PARTITION_BYTES=PARTITION)

    def work(kv):
        kv.declare("w", (ELEMENTS,), "float32", compression="2bit")
        value = gradient(7, 0) if kv.rank == 0 else np.zeros(ELEMENTS, np.float32)
        return kv.broadcast("w", value)

    for result in cluster.run(work):
        np.testing.assert_array_equal(result, gradient(7, 0))


def test_compression_of_an_integer_key_is_refused_naming_key_and_dtype(cluster_factory, engine):
    cluster = cluster_factory(1, 1)

    def work(kv):
        kv.set_compression({"type": "2bit", "threshold": 1})
        with pytest.raises(TypeError, match=r"key 'steps' is int64: gradient compression \(2bit\) takes float32"):
            kv.pushpull("steps", np.arange(4))
        kv.declare("steps", (4,), "int64", compression="none")   # a key may opt out
        np.testing.assert_array_equal(kv.pushpull("steps", np.arange(4)), np.arange(4))

    cluster.run(work)


HOSTILE = {
    # name: (payload for a 100-value 2bit chunk (28 bytes encoded), what the refusal says)
    "malformed": (bytes([0x40]) + bytes(27), r"worker 0 pushed key 'w' chunk 0 round 0: 28 bytes that are not an "
                                            r"encoding of the chunk"),
    "short": (bytes(24), r"worker 0 pushed key 'w' chunk 0 round 0: 24 bytes that are not an encoding"),
    "long": (bytes(29), r"PUSH of 29 bytes for key 'w' chunk 0 from worker 0, declared 400 \(2bit: at most 28 "
                        r"bytes encoded\)"),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_hostile_compressed_push_is_refused_naming_key_and_worker(cluster_factory, engine, attack):
    """Worker 0 pushes bytes that are no 2bit encoding of the chunk (a field 01, which MXNet
    never writes; too few bytes; more than the encoding's size): the server refuses it,
    naming the key and the worker, and worker 1's pushpull fails with that instead of
    summing it.  A too-long push is refused from its header, before any byte is taken in."""
    cluster = cluster_factory(2, 1, RDMAKV_ENGINE=engine)
    payload, message = HOSTILE[attack]

    work = push_raw_then_pushpull("2bit", payload)

    results, errors = cluster.run_collect(work)
    assert errors[1] is None, errors[1]
    assert re.search(message, results[1]), results[1]


TWOBIT_BYTES = 4 * sum(-(-(end - start) // 16) for start, end in chunk_bounds(ELEMENTS))


@pytest.mark.parametrize("setting, wire_bytes", [("none", 4 * ELEMENTS), ("fp16", 2 * ELEMENTS),
                                                 ("2bit", TWOBIT_BYTES)])
def test_what_crosses_the_wire_is_the_encoding(cluster_factory, engine, setting, wire_bytes):
    """The transports' byte counters (KVStore.wire_bytes): a round of pushpulls sends
    about the encoding's size, and receives the sum (an fp16 sum compressed too)."""
    cluster = cluster_factory(2, 2, RDMAKV_PARTITION_BYTES=PARTITION)
    rounds = 4
    pulled = 2 * ELEMENTS if setting == "fp16" else 4 * ELEMENTS

    def work(kv):
        kv.declare("w", (ELEMENTS,), "float32", compression=setting)
        kv.pushpull("w", gradient(kv.rank, 0))     # the declaration's and the first round's control frames
        before = kv.wire_bytes()
        for step in range(1, rounds + 1):
            kv.pushpull("w", gradient(kv.rank, step))
        after = kv.wire_bytes()
        return after["sent"] - before["sent"], after["received"] - before["received"]

    headers = rounds * len(chunk_bounds(ELEMENTS)) * protocol.HEADER_SIZE
    # Uncompressed pushes over shared memory may be added into the server's sums in place (only
    # their headers cross): the bytes are then a bound, not a measure.
    least = 0 if setting == "none" else rounds * wire_bytes + headers
    for sent, received in cluster.run(work):
        # Each chunk's push: a header and its encoding (compressed chunks are never summed in place).
        assert least <= sent <= rounds * wire_bytes + headers, (sent, setting)
        assert received <= rounds * pulled + headers, (received, setting)
        if setting != "none":
            assert rounds * pulled + headers == received, (received, setting)


@pytest.mark.mxnet
def test_with_a_server_optimizer_the_weight_is_pulled_as_the_codec_pulls(cluster_factory, engine):
    """SGD on the servers with fp16: the summed halves update the float32 weight, and the
    weight comes back as a half (as a sum would), on both data paths."""
    mx = pytest.importorskip("mxnet")
    from rdmakv.mxnet import optimizer as server_optimizers
    cluster = cluster_factory(2, 2, RDMAKV_PARTITION_BYTES=PARTITION)
    start = gradient(5, 0)

    def work(kv):
        kv.set_compression("fp16")
        kv.server_optimizer.set(server_optimizers.describe(mx.optimizer.SGD(learning_rate=0.5)))
        kv.init("w", start)
        kv.barrier()
        return [kv.pushpull("w", gradient(kv.rank, step)).copy() for step in range(ROUNDS)]

    results = cluster.run(work)
    weight = start.copy()
    for step in range(ROUNDS):
        summed = sum(ref.fp16_decode(ref.fp16_encode(gradient(rank, step))) for rank in range(2))
        weight = weight - np.float32(0.5) * summed
        for result in results:
            np.testing.assert_allclose(result[step], ref.fp16_decode(ref.fp16_encode(weight)), rtol=0, atol=0)


def test_asynchronous_mode_refuses_compression_by_name(engine):
    """Refused before joining: an async server applies each push alone, and would have to decode it alone."""
    with pytest.raises(ConfigError, match=r"gradient compression \(2bit\) is not supported in asynchronous mode "
                                          r"\(RDMAKV_MODE=async\)"):
        rdmakv.KVStore(mode="async", compression={"type": "2bit", "threshold": 1.0}, num_workers=2)
