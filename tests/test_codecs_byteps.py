"""BytePS's compressors (rdmakv/native/codecs_byteps.c): each codec's bounds,
its wire size, byte-for-byte agreement with the numpy rewrite in
codec_reference.py, and refusal of bytes that are not an encoding."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import codec_reference as ref
from rdmakv.native import _transport as t

floats = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)
tensors = st.lists(floats, min_size=1, max_size=300).map(lambda v: np.array(v, np.float32))
seeds = st.integers(0, 2**64 - 1)
partitions = st.sampled_from(["linear", "natural"])
norms = st.sampled_from(["max", "l2"])


def levels_for(partition):
    return st.integers(1, 40) | st.sampled_from([127, 255, 32767]) if partition == "linear" else st.integers(1, 31)


def decoded(decode_add, data, count, *params):
    out = np.zeros(count, np.float32)
    decode_add(data, out, *params)
    return out


# ---- onebit ----

@given(tensors, st.booleans())
def test_onebit_keeps_signs_at_one_scale(x, scaled):
    data = t.onebit_encode(x, scaled)
    assert data == ref.onebit_encode(x, scaled)
    assert len(data) == t.onebit_max_bytes(x.size) == 4 + math.ceil(x.size / 8)
    out = decoded(t.onebit_decode_add, data, x.size)
    scale = np.float32(np.abs(x.astype(np.float64)).mean()) if scaled else np.float32(1)
    assert np.allclose(np.abs(out), scale, rtol=1e-6, atol=0)
    assert np.all(np.abs(out) == np.abs(out[0]))
    if scale:                   # a scale that rounds to 0 decodes to -0.0, which added into 0.0 is 0.0
        assert np.array_equal(np.signbit(out), x < 0)


def test_onebit_is_32x_smaller_plus_its_scale():
    x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    assert len(t.onebit_encode(x)) / x.nbytes == pytest.approx(1 / 32 + 4 / x.nbytes)


# ---- top-k ----

@given(tensors, st.integers(1, 400))
def test_topk_keeps_the_k_largest_magnitudes_exactly(x, k):
    data = t.topk_encode(x, k)
    n = min(k, x.size)
    assert data == ref.topk_encode(x, k)
    assert len(data) == t.topk_max_bytes(x.size, k) == 8 * n
    indices = np.frombuffer(data[:4 * n], np.uint32)
    assert np.all(np.diff(indices.astype(np.int64)) > 0)
    out = decoded(t.topk_decode_add, data, x.size, k)
    kept = np.zeros(x.size, bool)
    kept[indices] = True
    assert np.array_equal(out[kept], x[kept])
    assert not out[~kept].any()
    assert np.array_equal(np.sort(np.abs(x[kept])), np.sort(np.abs(x))[x.size - n:])


@pytest.mark.parametrize("values", ["ties", "spread", "tiny"])
def test_topk_on_large_chunks_with_ties(values):
    """Selection over 200,000 values: many equal magnitudes (ties keep the lower
    index), a wide spread, and subnormals that differ only in their last bits."""
    rng = np.random.default_rng(4)
    x = {"ties": rng.integers(-3, 4, 200_000).astype(np.float32),
         "spread": (rng.standard_normal(200_000) * 10.0 ** rng.integers(-30, 30, 200_000)).astype(np.float32),
         "tiny": (rng.integers(-50, 50, 200_000) * np.float32(1e-45)).astype(np.float32)}[values]
    for k in (1, 1000, 77_777, 200_000):
        assert t.topk_encode(x, k) == ref.topk_encode(x, k)


# ---- random-k ----

@given(tensors, st.integers(1, 400), seeds)
def test_randomk_keeps_exactly_k_values_exactly(x, k, seed):
    data, after = t.randomk_encode(x, k, seed)
    n = min(k, x.size)
    assert (data, after) == ref.randomk_encode(x, k, seed)
    assert len(data) == t.randomk_max_bytes(x.size, k) == 8 * n
    indices = np.frombuffer(data[:4 * n], np.uint32)
    assert len(set(indices.tolist())) == n
    out = decoded(t.randomk_decode_add, data, x.size, k)
    assert np.array_equal(out[indices], x[indices])
    out[indices] = 0
    assert not out.any()
    assert t.randomk_encode(x, k, seed) == (data, after)      # the seed reproduces it


def test_randomk_draws_each_index_equally_often():
    count, k, draws = 20, 5, 4000
    hits = np.zeros(count)
    state = 12345
    x = np.arange(1, count + 1, dtype=np.float32)
    for _ in range(draws):
        data, state = t.randomk_encode(x, k, state)
        hits[np.frombuffer(data[:4 * k], np.uint32)] += 1
    expected = draws * k / count                       # 1000 each; binomial sd ~27
    assert np.all(np.abs(hits - expected) < 6 * math.sqrt(expected))


# ---- dithering ----

@given(st.data(), tensors, partitions, norms, seeds)
def test_dithering_rounds_to_a_neighbouring_level(data, x, partition, normalize, seed):
    levels = data.draw(levels_for(partition))
    encoded, after = t.dithering_encode(x, levels, partition, normalize, seed)
    assert (encoded, after) == ref.dithering_encode(x, levels, partition, normalize, seed)
    width = 1 + levels.bit_length()
    assert len(encoded) == t.dithering_max_bytes(x.size, levels, partition) == 4 + math.ceil(x.size * width / 8)
    out = decoded(t.dithering_decode_add, encoded, x.size, levels, partition)
    assert np.array_equal(out, ref.dithering_decode(encoded, x.size, levels, partition))
    norm = float(np.frombuffer(encoded[:4], np.float32)[0])
    assert not np.any((out != 0) & ((out < 0) != (x < 0)))          # signs kept (or 0)
    magnitudes = norm * ref.dithering_levels(levels, partition)
    ax, aout = np.abs(x.astype(np.float64)), np.abs(out.astype(np.float64))
    slack = 1e-5 * norm + 1e-30
    low = magnitudes[np.clip(np.searchsorted(magnitudes, ax - slack, side="right") - 1, 0, levels)]
    high = magnitudes[np.clip(np.searchsorted(magnitudes, ax + slack, side="left"), 0, levels)]
    assert np.all((aout >= low - slack) & (aout <= high + slack))
    if partition == "linear":     # BytePS's bound: within one level's width
        assert np.all(np.abs(out - x) <= norm / levels + slack)
    else:                         # within the width of the power-of-two interval holding |x|
        assert np.all(np.abs(out - x) <= np.maximum(norm / 2 ** (levels - 1), ax) + slack)


@pytest.mark.parametrize("partition", ["linear", "natural"])
def test_dithering_is_unbiased(partition):
    x = np.array([0.3, -0.71, 0.05, 1.0, -0.999, 0.5, 0.126], np.float32)
    total, state, draws = np.zeros(x.size), 7, 4000
    for _ in range(draws):
        encoded, state = t.dithering_encode(x, 2, partition, "max", state)
        total += decoded(t.dithering_decode_add, encoded, x.size, 2, partition)
    # each draw lies within one level width (<= 0.5 here) of x: sd of the mean <= 0.25 / sqrt(draws)
    assert np.all(np.abs(total / draws - x) < 6 * 0.25 / math.sqrt(draws))


def test_dithering_sizes_for_bytepss_defaults():
    x = np.ones(1 << 16, np.float32)
    for levels, bits in ((1, 2), (2, 3), (3, 3), (4, 4), (127, 8)):
        encoded, _ = t.dithering_encode(x, levels, "linear", "l2", 1)
        assert len(encoded) == 4 + x.size * bits // 8


# ---- what the encoders refuse ----

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_tensor_decodes_non_finite(bad):
    """As BytePS's: the scale (norm) of a tensor holding an inf or a NaN is not
    finite, so its values decode to non-finite values, as the sum would be
    uncompressed; nothing refuses them."""
    x = np.array([1, bad, -2], np.float32)
    out = decoded(t.onebit_decode_add, t.onebit_encode(x), 3)
    assert not np.isfinite(out).any()
    assert np.array_equal(decoded(t.onebit_decode_add, t.onebit_encode(x, False), 3), [1, 1 - 2 * (bad < 0), -1])
    for partition in ("linear", "natural"):
        for normalize in ("max", "l2"):
            encoded, _ = t.dithering_encode(x, 4, partition, normalize, 0)
            assert encoded == ref.dithering_encode(x, 4, partition, normalize, 0)[0]
            assert np.isnan(decoded(t.dithering_decode_add, encoded, 3, 4, partition)).all()
    # top-k keeps the NaN: it ranks above every magnitude
    np.testing.assert_array_equal(decoded(t.topk_decode_add, t.topk_encode(x, 1), 3, 1), [0, bad, 0])


def test_parameters_and_dtypes_are_checked():
    x = np.ones(8, np.float32)
    with pytest.raises(TypeError, match="float32"):
        t.onebit_encode(np.ones(8))
    with pytest.raises(TypeError, match="float32"):
        t.topk_decode_add(t.topk_encode(x, 2), np.zeros(8, np.int32), 2)
    with pytest.raises(ValueError, match="out of range"):
        t.topk_encode(x, 0)
    with pytest.raises(ValueError, match="out of range"):
        t.dithering_encode(x, 32, "natural", "max", 0)
    with pytest.raises(ValueError, match="out of range"):
        t.dithering_encode(x, 0, "linear", "max", 0)
    with pytest.raises(ValueError, match="partition"):
        t.dithering_encode(x, 4, "log", "max", 0)
    with pytest.raises(ValueError, match="normalization"):
        t.dithering_encode(x, 4, "linear", "l1", 0)


# ---- what the decoders refuse: hostile bytes, all or nothing ----

def refused(decode_add, data, count, *params):
    before = np.arange(count, dtype=np.float32)
    out = before.copy()
    with pytest.raises(ValueError, match="not an encoding"):
        decode_add(data, out, *params)
    assert np.array_equal(out, before)        # nothing added


def f32(v):
    return np.float32(v).tobytes()


def test_onebit_refuses_malformed_bytes():
    good = t.onebit_encode(np.array([1, -2, 3], np.float32))
    for data in (good[:-1], good + b"\0", b"", good[:4]):
        refused(t.onebit_decode_add, data, 3)
    for scale in (-np.inf, -1.0, -0.0):
        refused(t.onebit_decode_add, f32(scale) + good[4:], 3)
    refused(t.onebit_decode_add, good[:4] + bytes([good[4] | 0x08]), 3)      # a padding bit


def test_sparse_codecs_refuse_malformed_bytes():
    for decode_add in (t.topk_decode_add, t.randomk_decode_add):
        good = ref.sparse_bytes([1, 5], [1.0, 2.0])
        decoded(decode_add, good, 6, 2)
        for data in (good[:-1], good + b"\0" * 8, b""):
            refused(decode_add, data, 6, 2)
        refused(decode_add, good, 6, 3)                                      # k says 3 kept
        refused(decode_add, ref.sparse_bytes([1, 6], [1, 2]), 6, 2)          # index == count
        refused(decode_add, ref.sparse_bytes([1, 2**32 - 1], [1, 2]), 6, 2)
        refused(decode_add, ref.sparse_bytes([5, 1], [1, 2]), 6, 2)          # out of order
        refused(decode_add, ref.sparse_bytes([3, 3], [1, 2]), 6, 2)          # twice
        refused(decode_add, b"", 6, 0)                                       # k = 0 keeps nothing of 6
        decoded(decode_add, b"", 0, 0)                                       # an empty chunk: an empty encoding


def test_dithering_refuses_malformed_bytes():
    x = np.array([1, -0.5, 0.25, 0], np.float32)
    good, _ = t.dithering_encode(x, 2, "linear", "max", 3)        # 3-bit codes: 12 bits in 2 bytes
    for data in (good[:-1], good + b"\0", b""):
        refused(t.dithering_decode_add, data, 4, 2, "linear")
    refused(t.dithering_decode_add, good, 4, 8, "linear")                    # other levels, other width
    for norm in (-0.0, -np.inf, -2.0):
        refused(t.dithering_decode_add, f32(norm) + good[4:], 4, 2, "linear")
    refused(t.dithering_decode_add, f32(1) + bytes([0b110, 0]), 4, 2, "linear")     # m = 3 > 2 levels
    refused(t.dithering_decode_add, f32(1) + bytes([0b001, 0]), 4, 2, "linear")     # a negative zero
    refused(t.dithering_decode_add, f32(1) + bytes([0, 0x10]), 4, 2, "linear")      # a padding bit


@given(st.binary(max_size=80), st.integers(1, 40), st.integers(1, 8))
def test_decoders_refuse_or_decode_within_bounds_any_bytes(data, count, k):
    """Arbitrary bytes never crash a decoder: refused with dst untouched, or
    decoded into values the format can describe."""
    assume(count)
    cases = [(t.onebit_decode_add, ()), (t.topk_decode_add, (k,)), (t.randomk_decode_add, (k,)),
             (t.dithering_decode_add, (k, "linear")), (t.dithering_decode_add, (k, "natural"))]
    for decode_add, params in cases:
        out = np.zeros(count, np.float32)
        try:
            decode_add(data, out, *params)
        except ValueError:
            assert not out.any()
            continue
        if decode_add in (t.topk_decode_add, t.randomk_decode_add):
            assert np.count_nonzero(out) <= min(k, count)
        else:
            scale = np.frombuffer(data[:4], np.float32)[0]
            assert np.isnan(scale) or scale >= 0
            if np.isfinite(scale):
                assert np.all(np.abs(out) <= scale)


# ---- in codec.c's pipeline (rk_codec_encode / rk_codec_decode_add) ----

KINDS = {"onebit": 3, "topk": 4, "randomk": 5, "dithering": 6}
PIPELINE_PARAMS = {"onebit": dict(scaled=True), "topk": dict(k=7), "randomk": dict(k=7, seed=5),
                   "dithering": dict(levels=3, dither_partition=1, dither_normalize=1, seed=5)}


def pipeline_encode(state, codec, x):
    room = bytearray(codec.max_bytes(x.size))
    return bytes(room[:state.encode(x, room)])


@pytest.mark.parametrize("name", sorted(KINDS))
def test_the_codec_pipeline_dispatches_to_the_quantizers(name):
    x = np.random.default_rng(1).standard_normal(50).astype(np.float32)
    codec = t.Codec(KINDS[name], **PIPELINE_PARAMS[name])
    encoded = pipeline_encode(t.CodecState(codec, x.size, 3), codec, x)
    assert encoded == pipeline_encode(t.CodecState(codec, x.size, 3), codec, x)     # same seed and chunk
    if name == "onebit":
        assert encoded == t.onebit_encode(x, True)
    elif name == "topk":
        assert encoded == t.topk_encode(x, 7)
    out = np.zeros(x.size, np.float32)
    codec.decode_add(out, encoded)
    direct = {"onebit": lambda: decoded(t.onebit_decode_add, encoded, x.size),
              "topk": lambda: decoded(t.topk_decode_add, encoded, x.size, 7),
              "randomk": lambda: decoded(t.randomk_decode_add, encoded, x.size, 7),
              "dithering": lambda: decoded(t.dithering_decode_add, encoded, x.size, 3, "natural")}
    assert np.array_equal(out, direct[name]())
    with pytest.raises(ValueError, match="not an encoding"):
        codec.decode_add(out, encoded[:-1])


@pytest.mark.parametrize("name", sorted(KINDS))
def test_error_feedback_loses_nothing(name):
    """With error feedback, what was sent plus what is kept is what was given:
    sum of decode(encoding_t) + residual_T == sum of g_t (to float rounding)."""
    rng = np.random.default_rng(2)
    codec = t.Codec(KINDS[name], error_feedback=True, **PIPELINE_PARAMS[name])
    state = t.CodecState(codec, 64, 0)
    given_sum, sent_sum = np.zeros(64), np.zeros(64, np.float32)
    for _ in range(20):
        g = rng.standard_normal(64).astype(np.float32)
        given_sum += g
        codec.decode_add(sent_sum, pipeline_encode(state, codec, g))
    residual = np.frombuffer(state.residual(), np.float32)
    assert np.allclose(sent_sum + residual, given_sum, atol=1e-4)
    assert np.abs(residual).max() > 0           # something was held back
    assert t.CodecState(t.Codec(KINDS[name], **PIPELINE_PARAMS[name]), 64, 0).residual() is None
