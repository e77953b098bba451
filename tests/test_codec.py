"""The codecs (rdmakv/native/codec.c) against numpy's own versions of them
(tests/codec_reference.py), and the compression settings
(rdmakv/core/compression.py): hypothesis properties, no cluster."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import codec_reference as ref
from rdmakv.core import compression
from rdmakv.core.compression import Compression, CompressionError
from rdmakv.native import transport as t

FP16_MAX = 65504.0


def floats(limit):
    return hnp.arrays(np.float32, st.integers(0, 80),
                      elements=st.floats(-limit, limit, width=32, allow_nan=False, allow_infinity=False))


def encode(state, codec, values):
    out = bytearray(codec.max_bytes(len(values)))
    return bytes(out[:state.encode(values, out)])


def decode(codec, data, count):
    out = np.zeros(count, np.float32)
    codec.decode_add(out, data)
    return out


@given(floats(4.0), st.floats(0.125, 2.0, width=32), st.integers(1, 4))
def test_2bit_is_mxnets_bit_for_bit_and_keeps_what_it_leaves_out(values, threshold, rounds):
    codec = Compression(kind="2bit", threshold=threshold).codec(len(values))
    state = t.CodecState(codec, len(values))
    residual = np.zeros(len(values), np.float32)
    for step in range(rounds):
        grad = values * np.float32(step + 1)
        data = encode(state, codec, grad)
        expected, new_residual = ref.twobit_encode(grad, residual, threshold)
        assert len(data) == codec.max_bytes(len(values)) == 4 * math.ceil(len(values) / 16)
        assert data == expected
        kept = np.frombuffer(state.residual(), np.float32)
        np.testing.assert_array_equal(kept, new_residual)
        decoded = decode(codec, data, len(values))
        np.testing.assert_array_equal(decoded, ref.twobit_decode(data, len(values), threshold))
        assert set(np.unique(decoded)) <= {0, np.float32(threshold), -np.float32(threshold)}
        # What was pushed plus what is kept is what there was to push, to float rounding.
        np.testing.assert_allclose(decoded + kept, grad + residual, rtol=1e-6, atol=1e-6 * threshold)
        residual = new_residual


@given(st.integers(0, 40), st.data())
def test_2bit_decoding_takes_exactly_mxnets_encodings(count, data):
    codec = Compression(kind="2bit", threshold=1.0).codec(count)
    size = codec.max_bytes(count)
    raw = data.draw(st.binary(min_size=max(0, size - 2), max_size=size + 2))
    fields = [(byte >> shift) & 3 for byte in raw for shift in (6, 4, 2, 0)]
    # A field j of a block sits in byte j//4 at bits 7-6 first: the order above is value order.
    valid = len(raw) == size and 1 not in fields and not any(fields[count:])
    dst = np.full(count, 7, np.float32)
    if valid:
        codec.decode_add(dst, raw)
        np.testing.assert_array_equal(dst, 7 + ref.twobit_decode(raw, count, 1.0))
    else:
        with pytest.raises(ValueError, match="not an encoding"):
            codec.decode_add(dst, raw)
        np.testing.assert_array_equal(dst, 7)   # untouched


@given(floats(FP16_MAX), st.booleans())
def test_fp16_is_numpys_half_and_error_feedback_keeps_the_rest(values, error_feedback):
    codec = Compression(kind="fp16", error_feedback=error_feedback).codec(len(values))
    state = t.CodecState(codec, len(values))
    data = encode(state, codec, values)
    assert len(data) == codec.max_bytes(len(values)) == 2 * len(values)
    # With error feedback the value encoded is value + residual (0 at first: -0 becomes +0).
    assert data == ref.fp16_encode(values + np.zeros_like(values) if error_feedback else values)
    decoded = decode(codec, data, len(values))
    np.testing.assert_array_equal(decoded, ref.fp16_decode(data))
    if not error_feedback:
        assert state.residual() is None
        return
    kept = np.frombuffer(state.residual(), np.float32).copy()
    np.testing.assert_array_equal(decoded + kept, values)
    # The next round encodes the value plus what the last one left out.
    again = encode(state, codec, values)
    assert again == ref.fp16_encode(values + kept)


@given(floats(100.0), st.floats(0.125, 0.875, width=32))
def test_nesterov_momentum_is_bytepss(values, mu):
    codec = Compression(kind="fp16", momentum=mu).codec(len(values))
    state = t.CodecState(codec, len(values))
    momentum = np.zeros(len(values), np.float32)
    mu = np.float32(mu)
    for _ in range(3):
        momentum = values + mu * momentum          # m = mu*m + g
        pushed = values + mu * momentum            # p = g + mu*m
        assert encode(state, codec, values) == ref.fp16_encode(pushed)


def test_a_kind_this_build_lacks_is_named():
    with pytest.raises(ValueError, match="not implemented"):
        t.Codec(len(compression.KINDS))


# ---- the settings ----------------------------------------------------------------------
def test_mxnet_and_byteps_settings():
    assert compression.parse({"type": "2bit", "threshold": 0.25}) == Compression(kind="2bit", threshold=0.25)
    assert compression.parse({"type": "2bit"}).threshold == 0.5          # MXNet's default
    assert compression.parse({"type": "2bit", "threshold": "2"}).threshold == 2.0
    assert compression.parse("fp16") == compression.parse({"fp16": True}) == Compression(kind="fp16")
    assert compression.parse(None) == compression.parse("none") == compression.parse({}) == compression.NONE
    parsed = compression.parse({"compressor": "topk", "k": 0.01, "ef": "vanilla", "momentum": "nesterov",
                                "mu": 0.9, "seed": 3, "fp16": True})
    assert parsed == Compression(kind="topk", k=0.01, error_feedback=True, momentum=0.9, seed=3)
    assert parsed.count_kept(1000) == 10 and parsed.count_kept(50) == 1
    assert compression.parse({"compressor": "randomk", "k": 30}).count_kept(20) == 20
    assert compression.parse({"compressor": "onebit", "scaling": "True"}).scaling
    assert compression.parse({"compressor": "dithering", "k": 4, "partition": "natural",
                              "normalize": "l2"}) == Compression(kind="dithering", k=4, partition="natural",
                                                                 normalize="l2")


@pytest.mark.parametrize("params, message", [
    ({"type": "1bit"}, "Unknown type for gradient compression '1bit'"),
    ({"type": "2bit", "threshold": 0}, "threshold must be greater than 0"),
    ({"type": "2bit", "threshold": -1}, "threshold must be greater than 0"),
    ({"type": "2bit", "threshold": "x"}, "'threshold' must be a number"),
    ({"type": "2bit", "thresold": 1}, r"unknown MXNet gradient compression parameter\(s\) \['thresold'\]"),
    ({"compressor": "topk"}, "compressor 'topk' needs 'k'"),
    ({"compressor": "topk", "k": 1.5}, "topk needs k, a fraction"),
    ({"compressor": "zip"}, "compressor 'zip' is not one of"),
    ({"compressor": "onebit", "ef": "corrected"}, "ef 'corrected' is not supported"),
    ({"compressor": "onebit", "momentum": "nesterov"}, "needs 'mu'"),
    ({"compressor": "onebit", "momentum": "nesterov", "mu": 1.5}, r"momentum mu must be in \[0, 1\)"),
    ({"compressor": "dithering", "k": 2, "partition": "log"}, "partition 'log' is not one of"),
    ({"compressor": "onebit", "speed": 1}, r"unknown compression parameter\(s\) \['speed'\]"),
    ("3bit", "a name alone is"),
    (5, "must be a dict"),
])
def test_bad_settings_are_named(params, message):
    with pytest.raises(CompressionError, match=message):
        compression.parse(params)


settings = st.builds(
    Compression, kind=st.sampled_from(sorted(compression.KINDS)), error_feedback=st.booleans(),
    scaling=st.booleans(), partition=st.sampled_from(compression.PARTITIONS),
    normalize=st.sampled_from(compression.NORMALIZE), k=st.sampled_from([0.0, 0.5, 3.0, 8.0]),
    threshold=st.sampled_from([0.0, 0.5, 2.0]), momentum=st.sampled_from([0.0, 0.9]), seed=st.integers(0, 2**64 - 1))


@given(settings)
def test_a_declaration_carries_settings_whole(made):
    try:
        made._check()
    except CompressionError:
        with pytest.raises(CompressionError):
            Compression.from_wire({**made.__dict__})
        return
    assert Compression.from_wire(made.wire()) == (made if made.active else compression.NONE)


json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)


@given(st.dictionaries(st.sampled_from(sorted(Compression.__dataclass_fields__)), json) | json)
def test_a_hostile_declaration_is_refused_by_name(wire):
    try:
        Compression.from_wire(wire)
    except CompressionError:
        pass
