"""BytePS's compressors end to end on real local clusters (2 workers, 2
servers): each worker encodes its gradient (with error feedback and momentum
where asked), each server decodes both pushes, sums them and encodes the sum
for the pull, and each worker decodes that.  Every round's result is checked,
bit for bit, against the same pipeline run in numpy (tests/codec_reference.py),
on both data paths and every transport."""
import re

import numpy as np
import pytest


import codec_reference as ref
from kvstore_helpers import push_raw_then_pushpull
from rdmakv.core import compression, partition, protocol

pytestmark = pytest.mark.usefixtures("transport")   # each test once per transport, named in its id

ELEMENTS = 5000                   # two chunks (3072 and 1928 values), one on each server
PARTITION = 16384
ROUNDS = 3

SETTINGS = {
    "onebit+ef": {"compressor": "onebit", "scaling": True, "ef": "vanilla"},
    "topk+ef+momentum": {"compressor": "topk", "k": 0.01, "ef": "vanilla", "momentum": "nesterov", "mu": 0.9},
    "randomk": {"compressor": "randomk", "k": 0.05, "seed": 7},
    "dithering-natural-l2+ef": {"compressor": "dithering", "k": 3, "partition": "natural", "normalize": "l2",
                                "seed": 11, "ef": "vanilla"},
    "dithering-linear-max": {"compressor": "dithering", "k": 4, "seed": 5},
}


@pytest.fixture(params=["native", "python"])
def engine(request, monkeypatch):
    monkeypatch.setenv("RDMAKV_ENGINE", request.param)
    return request.param


def gradient(rank, step):
    rng = np.random.default_rng(100 * rank + step)
    return rng.standard_normal(ELEMENTS).astype(np.float32)


def chunk_bounds():
    """The key's chunks as the workers cut it (each chunk is encoded on its own)."""
    return [(offset // 4, (offset + nbytes) // 4) for offset, nbytes in partition.split(ELEMENTS * 4, 4, PARTITION)]


class Encoder:
    """codec.c's rk_codec_encode for one chunk, in numpy: nesterov momentum, error
    feedback, then the quantizer; the random stream starts at seed + (chunk + 1) * gamma."""

    def __init__(self, settings, count, chunk, server=False):
        self.settings = settings if not server else settings.for_server()
        self.count = count
        self.residual = np.zeros(count, np.float32)
        self.momentum = np.zeros(count, np.float32)
        self.rng = (settings.seed + (chunk + 1) * int(ref.GAMMA)) & ref.MASK64

    def encode(self, g):
        s = self.settings
        p = g
        if s.momentum:
            mu = np.float32(s.momentum)
            self.momentum = p + mu * self.momentum
            p = p + mu * self.momentum
        w = p + self.residual if s.error_feedback else p
        if s.kind == "onebit":
            data = ref.onebit_encode(w, s.scaling)
        elif s.kind == "topk":
            data = ref.topk_encode(w, s.count_kept(self.count))
        elif s.kind == "randomk":
            data, self.rng = ref.randomk_encode(w, s.count_kept(self.count), self.rng)
        else:
            data, self.rng = ref.dithering_encode(w, int(s.k), s.partition, s.normalize, self.rng)
        if s.error_feedback:
            self.residual = w - self.decode(data)
        return data

    def decode(self, data):
        s = self.settings
        if s.kind == "onebit":
            return ref.onebit_decode(data, self.count)
        if s.kind in ("topk", "randomk"):
            return ref.sparse_decode(data, self.count)
        return ref.dithering_decode(data, self.count, int(s.k), s.partition)


def expected_rounds(settings):
    """What every worker pulls in each round: per chunk, the server's encoding of
    the sum of both workers' decoded pushes, decoded."""
    bounds = chunk_bounds()
    workers = [[Encoder(settings, end - start, index) for index, (start, end) in enumerate(bounds)]
               for _ in range(2)]
    servers = [Encoder(settings, end - start, index, server=True) for index, (start, end) in enumerate(bounds)]
    rounds = []
    for step in range(ROUNDS):
        pulled = np.zeros(ELEMENTS, np.float32)
        for index, (start, end) in enumerate(bounds):
            summed = np.zeros(end - start, np.float32)
            for rank in range(2):
                encoder = workers[rank][index]
                summed += encoder.decode(encoder.encode(gradient(rank, step)[start:end]))
            pulled[start:end] = servers[index].decode(servers[index].encode(summed))
        rounds.append(pulled)
    return rounds


def encoded_bytes(settings, count):
    """codecs_byteps.h's sizes."""
    if settings.kind == "onebit":
        return 4 + -(-count // 8)
    if settings.kind in ("topk", "randomk"):
        return 8 * settings.count_kept(count)
    return 4 + -(-count * ref.code_bits(int(settings.k)) // 8)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_sums_are_numpys_pipeline_bit_for_bit(cluster_factory, engine, name):
    cluster = cluster_factory(2, 2, RDMAKV_PARTITION_BYTES=PARTITION)

    def work(kv):
        kv.declare("w", (ELEMENTS,), "float32", compression=SETTINGS[name])
        kv.declare("empty", (0,), "float32", compression=SETTINGS[name])
        assert kv.pushpull("empty", np.zeros(0, np.float32)).shape == (0,)      # one empty chunk
        pulled = [kv.pushpull("w", gradient(kv.rank, 0)).copy()]     # and the declaration's control frames
        before = kv.wire_bytes()
        pulled += [kv.pushpull("w", gradient(kv.rank, step)).copy() for step in range(1, ROUNDS)]
        after = kv.wire_bytes()
        return pulled, (after["sent"] - before["sent"], after["received"] - before["received"])

    results = cluster.run(work)
    settings = compression.parse(SETTINGS[name])
    for step, expected in enumerate(expected_rounds(settings)):
        for result, _ in results:
            np.testing.assert_array_equal(result[step], expected, err_msg=f"{name}, round {step}")
        if settings.kind in ("topk", "randomk"):     # the pull is sparse again: k per chunk
            assert np.count_nonzero(expected) <= sum(settings.count_kept(end - start) for start, end in chunk_bounds())
        assert np.count_nonzero(expected) > 0
    # What crossed the wire (the transports' counters): each chunk's header and its encoding,
    # both ways, the pull being the server's encoding of the sum, of the same size.
    per_round = sum(protocol.HEADER_SIZE + encoded_bytes(settings, end - start) for start, end in chunk_bounds())
    for _, wire in results:
        assert wire == ((ROUNDS - 1) * per_round,) * 2, (wire, per_round)


def test_a_nan_gradient_gives_nan_as_uncompressed_and_the_job_goes_on(cluster_factory, engine):
    """onebit's scale of a gradient holding a NaN is NaN: the sum is NaN, as it
    would be without compression (and BytePS's), not a refused push."""
    cluster = cluster_factory(2, 1)

    def work(kv):
        kv.declare("w", (8,), "float32", compression={"compressor": "onebit", "scaling": True})
        grad = np.ones(8, np.float32)
        grad[3] = np.nan if kv.rank == 0 else 1
        poisoned = kv.pushpull("w", grad).copy()
        return poisoned, kv.pushpull("v", np.full(4, kv.rank + 1, np.float32)).copy()

    for poisoned, after in cluster.run(work):
        assert np.isnan(poisoned).all()
        np.testing.assert_array_equal(after, np.full(4, 3, np.float32))


def test_settings_out_of_the_codecs_range_are_refused_when_read():
    with pytest.raises(compression.CompressionError, match="at most 31 levels"):
        compression.parse({"compressor": "dithering", "k": 32, "partition": "natural"})
    with pytest.raises(compression.CompressionError, match="at most 32767 levels"):
        compression.parse({"compressor": "dithering", "k": 40000})
    assert compression.parse({"compressor": "dithering", "k": 32767}).codec(10).max_bytes(10) == 4 + 20


HOSTILE = {
    # name: (the key's compression, a payload for its 100-value chunk that is no encoding of it)
    "topk index past the chunk": ({"compressor": "topk", "k": 2}, ref.sparse_bytes([3, 100], [1, 1])),
    "randomk index twice": ({"compressor": "randomk", "k": 2}, ref.sparse_bytes([7, 7], [1, 1])),
    "onebit padding bit": ({"compressor": "onebit"}, np.float32(1).tobytes() + bytes(12) + bytes([0x10])),
    "dithering level above k": ({"compressor": "dithering", "k": 2},
                                np.float32(1).tobytes() + bytes([0b110]) + bytes(37)),
    "negative scale": ({"compressor": "onebit"}, np.float32(-1).tobytes() + bytes(13)),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_push_that_is_no_encoding_is_refused_naming_key_and_worker(cluster_factory, engine, attack):
    """Worker 0 pushes bytes of the right size that no encoder writes: the server
    refuses them, naming the key and the worker, and worker 1's pushpull fails
    with that instead of summing them."""
    cluster = cluster_factory(2, 1, RDMAKV_ENGINE=engine)
    setting, payload = HOSTILE[attack]

    work = push_raw_then_pushpull(setting, payload)

    assert len(payload) == compression.parse(HOSTILE[attack][0]).codec(100).max_bytes(100)
    results, errors = cluster.run_collect(work)
    assert errors[1] is None, errors[1]
    assert re.search(rf"worker 0 pushed key 'w' chunk 0 round 0: {len(payload)} bytes that are not an encoding",
                     results[1]), results[1]
