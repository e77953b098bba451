import numpy as np
import pytest
from hypothesis import given, strategies as st

from rdmakv.core import protocol
from rdmakv.core.errors import ProtocolError
from rdmakv.core.protocol import Op
from rdmakv.native import transport


def test_header_round_trip():
    data = protocol.pack(Op.PUSH, dtype=2, flags=protocol.FLAG_BROADCAST, key=2**64 - 1, chunk=7,
                         priority=-3, round=2**40, length=4096, sender=5)
    assert len(data) == protocol.HEADER_SIZE == 48
    header = protocol.unpack(data)
    assert header == protocol.Header(Op.PUSH, 2, protocol.FLAG_BROADCAST, 2**64 - 1, 7, -3, 2**40, 4096, 5)


@given(op=st.sampled_from(sorted(Op.NAMES)), key=st.integers(0, 2**64 - 1), chunk=st.integers(0, 2**32 - 1),
       rnd=st.integers(0, 2**64 - 1))
def test_a_tag_is_its_header_fields_and_keeps_the_wire_bytes(op, key, chunk, rnd):
    import struct
    from rdmakv.transport.verbs.frames import OFFER
    tag = protocol.tag(op, key, chunk, rnd)
    header = protocol.pack(op, dtype=2, flags=protocol.FLAG_ACK, key=key, chunk=chunk, priority=-1, round=rnd,
                           length=99)
    assert protocol.tag_of(protocol.unpack(header)) == protocol.tag_of_frame(header) == tag
    assert protocol.tag_of_frame(protocol.tagged_header(tag, 40)) == tag
    assert protocol.tagged_header(tag, 40) == protocol.pack(op, key=key, chunk=chunk, round=rnd, length=40)
    assert str(tag) == f"{protocol.op_name(op)} key {key} chunk {chunk} round {rnd}"
    # The verbs OFFER body: the stream where op, key and chunk were before tags.
    stream = tag.stream.to_bytes(protocol.TAG_STREAM_BYTES, "little")
    assert OFFER.pack(stream, rnd, 1 << 20, 4096, 7) == struct.pack("<BQIQQQI", op, key, chunk, rnd, 1 << 20, 4096, 7)
    assert protocol.tag(op, key, chunk, rnd + 1).stream == tag.stream != protocol.tag(op, key, chunk ^ 1, rnd).stream


@pytest.mark.parametrize("field,index,value,message", [
    ("magic", 0, 0x12345678, "magic"),
    ("version", 1, 99, "version"),
    ("op", 2, 200, "op"),
    ("dtype", 3, 99, "dtype"),
    ("flags", 4, 1 << 20, "flags"),
])
def test_each_bad_field_is_named(field, index, value, message):
    fields = list(protocol.HEADER.unpack(protocol.pack(Op.PUSH, dtype=2)))
    fields[index] = value
    with pytest.raises(ProtocolError, match=message):
        protocol.unpack(protocol.HEADER.pack(*fields))


@given(st.binary(min_size=48, max_size=48))
def test_random_headers_either_parse_or_raise_protocol_error(data):
    try:
        header = protocol.unpack(data)
    except ProtocolError:
        return
    assert header.op in protocol.Op.NAMES


@given(st.binary(max_size=200))
def test_control_payloads_decode_only_json_objects(data):
    try:
        obj = protocol.decode_json(data)
    except ProtocolError:
        return
    assert isinstance(obj, dict)


def test_dtype_codes_match_the_reduction_kernel():
    rng = np.random.default_rng(0)
    for name, code in protocol.DTYPE_CODES.items():
        a = rng.integers(-100, 100, 1001).astype(name)
        b = rng.integers(-100, 100, 1001).astype(name)
        expected = a + b
        transport.add_into(a, b, code)
        np.testing.assert_array_equal(a, expected)


@given(st.sampled_from(sorted(protocol.DTYPE_CODES)), st.integers(0, 300), st.integers(0, 2**32 - 1))
def test_reduction_equals_numpy_including_integer_wraparound(name, size, seed):
    rng = np.random.default_rng(seed)
    info = np.iinfo(name) if np.dtype(name).kind in "iu" else None
    if info is not None:
        a = rng.integers(info.min, info.max, size, dtype=name, endpoint=True)
        b = rng.integers(info.min, info.max, size, dtype=name, endpoint=True)
    else:
        a = rng.standard_normal(size).astype(name)
        b = rng.standard_normal(size).astype(name)
    expected = a + b
    transport.add_into(a, b, protocol.DTYPE_CODES[name])
    np.testing.assert_array_equal(a, expected)


def test_reduction_rejects_mismatched_buffers():
    with pytest.raises(ValueError, match="bytes"):
        transport.add_into(np.zeros(4, np.float32), np.zeros(3, np.float32), protocol.DTYPE_CODES["float32"])
    with pytest.raises(ValueError, match="dtype code"):
        transport.add_into(np.zeros(4, np.float32), np.zeros(4, np.float32), 99)
    with pytest.raises(ValueError, match="not contiguous"):
        transport.add_into(np.zeros(4, np.float32)[::2], np.zeros(2, np.float32), 2)
