"""Hostile input against a live server from raw sockets: random bytes,
hypothesis-generated headers and mutations of valid frames (bad magic,
version, op, flags, dtype, huge lengths, wrong chunk/round/dtype, truncated
frames, garbage JSON).  The server must never crash, must close the hostile
connections, must keep its threads and descriptors bounded, and real workers
summing against it meanwhile must get exact sums.  The number of inputs tried
is printed (FIGURE lines)."""
import json
import math
import os
import random
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rdmakv.core import partition, protocol
from rdmakv.core.errors import ProtocolError
from rdmakv.core.protocol import Op
from rdmakv.server.server import ParameterServer
from rdmakv.worker.kvstore import wire_key

FUZZ_SECONDS = float(os.environ.get("RDMAKV_FUZZ_SECONDS", "10"))          # mutated frames and random bytes
HYPOTHESIS_FRAMES = int(os.environ.get("RDMAKV_FUZZ_HYPOTHESIS", "300"))  # generated headers
U = {"I": 2**32 - 1, "H": 2**16 - 1, "B": 255, "Q": 2**64 - 1, "i": 2**31 - 1}


def frame(op, payload=b"", **fields):
    return protocol.pack(op, length=len(payload), **fields) + payload


def raw_header(magic, version, op, dtype, flags, key, chunk, priority, rnd, length, sender):
    return protocol.HEADER.pack(magic, version, op, dtype, flags, key, chunk, priority, rnd, length, sender)


header_fields = st.tuples(
    st.one_of(st.just(protocol.MAGIC), st.integers(0, U["I"])),
    st.one_of(st.just(protocol.VERSION), st.integers(0, U["H"])),
    st.one_of(st.sampled_from(sorted(Op.NAMES)), st.integers(0, U["B"])),
    st.integers(0, 9), st.integers(0, 4),
    st.integers(0, U["Q"]), st.integers(0, U["I"]), st.integers(-2**31, U["i"]),
    st.integers(0, U["Q"]),
    st.one_of(st.integers(0, 256), st.integers(0, U["Q"])),
    st.integers(0, U["I"]))


def layout(key_wire, name, dtype, shape, partition_bytes):
    itemsize = np.dtype(dtype).itemsize
    size = partition.chunk_size(math.prod(shape) * itemsize, itemsize, partition_bytes)
    return json.loads(protocol.declaration(key_wire, name, dtype, shape, size))


def mutations(rng, valid):
    """Ways to spoil a valid frame, each a (kind, bytes) pair."""
    head, payload = bytearray(valid[:48]), valid[48:]
    fields = list(protocol.HEADER.unpack(bytes(head)))
    kind = rng.choice(["magic", "version", "op", "dtype", "flags", "length-huge", "length-short",
                       "truncated", "bitflip", "chunk", "round", "json", "extra"])
    if kind == "truncated":
        return kind, valid[:rng.randrange(1, len(valid))]
    if kind == "bitflip":
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return kind, bytes(data)
    if kind == "json":
        garbage = rng.choice([b"{", b"[]", b"null", b"\xff\xfe", b'{"key": "x"}', b'{"rank": -1}',
                              b'{"rank": 1e309}', b'{"key": 1, "chunk_bytes": -5}',
                              b'{"a":' * 5000, bytes(rng.randrange(256) for _ in range(64))])
        fields[9] = len(garbage)
        return kind, protocol.HEADER.pack(*fields) + garbage
    if kind == "extra":
        return kind, valid + bytes(rng.randrange(256) for _ in range(rng.randint(1, 100)))
    index, value = {
        "magic": (0, rng.randrange(2**32)), "version": (1, rng.choice([0, 2, 65535])),
        "op": (2, rng.choice([0, 7, 20, 29, 31, 255])), "dtype": (3, rng.choice([0, 8, 99, 255])),
        "flags": (4, rng.choice([4, 8, 255])),
        "length-huge": (9, rng.choice([2**31, 2**40, 2**64 - 1, protocol.MAX_CONTROL_BYTES + 1])),
        "length-short": (9, max(0, len(payload) - rng.randint(1, 8))),
        "chunk": (6, rng.choice([1, 7, 2**32 - 1])), "round": (8, rng.choice([1, 5, 2**63])),
    }[kind]
    fields[index] = value
    return kind, protocol.HEADER.pack(*fields) + payload


def try_frame(address, data, wait=0.25):
    """Send data on a fresh connection; True if the server then closed it (else we close it)."""
    with socket.create_connection(address, timeout=5) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return True
        sock.settimeout(wait)
        try:
            while True:
                if not sock.recv(65536):
                    return True
        except socket.timeout:
            return False
        except OSError:
            return True


def proc_counts(pid):
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(180)
def test_live_server_survives_hostile_connections_while_workers_sum(cluster_factory):
    cluster = cluster_factory(2, 1, RDMAKV_PARTITION_BYTES=4096)
    stores = cluster.connect()
    server_pid = cluster.procs[1].pid
    address = stores[0]._links[0].address
    stop = threading.Event()
    rounds = [0, 0]

    def work(kv):
        rng = np.random.default_rng(kv.rank)
        round_ = 0
        while True:
            for key, shape in enumerate([(3000,), (17, 33), (1,)]):
                value = ((np.arange(np.prod(shape)) * (key + 1) + round_) % 7).astype(np.int32).reshape(shape)
                out = kv.pushpull(f"h{key}", value * (kv.rank + 1), out=np.empty_like(value))
                assert np.array_equal(out, value * 3), f"round {round_} key {key}: wrong sum"
            round_ += 1
            rounds[kv.rank] = round_
            rng.random()
            # Both workers stop after the same round: one seeing `stop` a round
            # before the other would leave its peer waiting for a push forever.
            if kv.pushpull("stop", np.array([stop.is_set()], np.int32))[0]:
                return round_

    results = {}
    workers = threading.Thread(target=lambda: results.update(r=cluster.run_collect(work, timeout=150)),
                               daemon=True)
    workers.start()
    time.sleep(0.5)
    baseline = proc_counts(server_pid)

    lay = layout(wire_key("h0"), "h0", "int32", (3000,), 4096)
    valid = [frame(Op.CONNECT, protocol.encode_json({"rank": 0})),
             frame(Op.CONNECT, protocol.encode_json({"rank": 7})),
             frame(Op.DECLARE, protocol.encode_json(lay)),
             frame(Op.PUSH, bytes(4096), dtype=6, key=lay["key"], chunk=0),
             frame(Op.HELLO, protocol.encode_json({"role": "worker", "host": "x", "port": 1}))]
    rng = random.Random(6)
    tried = {"random bytes": 0, "hypothesis headers": 0, "mutated frames": 0}
    closed = {"by server": 0, "by us (incomplete frame)": 0}
    deadline = time.monotonic() + FUZZ_SECONDS

    def record(shut):
        closed["by server" if shut else "by us (incomplete frame)"] += 1

    @settings(max_examples=HYPOTHESIS_FRAMES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fields=header_fields, payload=st.binary(max_size=64))
    def hypothesis_headers(fields, payload):
        tried["hypothesis headers"] += 1
        record(try_frame(address, raw_header(*fields) + payload, wait=0.1))

    hypothesis_headers()
    while time.monotonic() < deadline:
        if rng.random() < 0.25:
            tried["random bytes"] += 1
            data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
            record(try_frame(address, data, wait=0.1))
        else:
            tried["mutated frames"] += 1
            kind, data = mutations(rng, rng.choice(valid))
            strict = kind in ("magic", "version", "op", "flags", "length-huge") and len(data) >= 48
            shut = try_frame(address, data, wait=2.0 if strict else 0.1)
            record(shut)
            if strict:
                assert shut, f"the server kept a connection open after a frame with a bad {kind}"
        assert cluster.procs[1].poll() is None, "the server died"
    for valid_frame in valid[:2]:     # CONNECT as a rank already taken, and as one out of range
        assert try_frame(address, valid_frame, wait=2.0)

    stop.set()
    workers.join(160)
    done, errors = results["r"]
    assert errors == [None, None], errors
    assert min(done) >= 2, f"the workers completed only {done} rounds during the fuzzing"
    time.sleep(1.0)
    after = proc_counts(server_pid)
    assert cluster.procs[1].poll() is None
    assert after[0] <= baseline[0] + 2 and after[1] <= baseline[1] + 2, (baseline, after)
    total = sum(tried.values())
    print(f"\nFIGURE hostile live server: {total} inputs {tried}; connections {closed}; "
          f"workers did {done} exact rounds meanwhile; server threads/fds {baseline} -> {after}")


# ---- the decoder and the layout validation, straight ---------------------------------------

@given(st.binary(max_size=4096))
def test_decode_json_accepts_only_objects(payload):
    try:
        obj = protocol.decode_json(payload)
    except ProtocolError:
        return
    assert isinstance(obj, dict)


@given(fields=header_fields)
def test_unpack_validates_every_field(fields):
    try:
        header = protocol.unpack(raw_header(*fields))
    except ProtocolError:
        return
    assert fields[0] == protocol.MAGIC and fields[1] == protocol.VERSION
    assert header.op in Op.NAMES and not header.flags & ~protocol.KNOWN_FLAGS
    assert header.dtype == 0 or header.dtype in protocol.DTYPE_NAMES


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def lone_server():
    """A real ParameterServer object (listening, never joined) for its validation methods."""
    server = ParameterServer(num_servers=2, scheduler_host="127.0.0.1", node_host="127.0.0.1",
                             transport="tcp")
    yield server
    server.close()


def mutate_layout(data, base):
    lay = json.loads(json.dumps(base))
    field = data.draw(st.sampled_from(["key", "name", "dtype", "shape", "chunk_bytes", "drop"]))
    if field == "drop":
        del lay[data.draw(st.sampled_from(sorted(lay)))]
    else:
        lay[field] = data.draw(json_values)
    return lay


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_validate_layout_refuses_or_accepts_consistently(lone_server, data):
    shape = data.draw(st.lists(st.integers(0, 40), max_size=3))
    dtype = data.draw(st.sampled_from(sorted(protocol.DTYPE_CODES)))
    base = layout(5, "k", dtype, shape, data.draw(st.sampled_from([8, 64, 4096])))
    lone_server._validate_layout(5, base)            # what a real worker declares is accepted
    lay = mutate_layout(data, base) if data.draw(st.booleans()) else data.draw(
        st.dictionaries(st.sampled_from(["key", "name", "dtype", "shape", "chunk_bytes"]), json_values))
    try:
        lone_server._validate_layout(5, lay)
    except ProtocolError:
        return
    # Accepted: then it gives at most MAX_KEY_CHUNKS whole-item chunks that tile the tensor exactly,
    # on existing servers.
    itemsize = np.dtype(lay["dtype"]).itemsize
    nbytes = math.prod(lay["shape"]) * itemsize
    assert partition.chunk_count(nbytes, lay["chunk_bytes"]) <= protocol.MAX_KEY_CHUNKS
    _, here = lone_server._resolve(lay)
    chunks = partition.place(5, partition.pieces(nbytes, lay["chunk_bytes"]), 2)
    assert sum(c.nbytes for c in chunks) == nbytes and all(0 <= c.server < 2 for c in chunks)
    assert all(c.nbytes % itemsize == 0 and c.nbytes <= protocol.MAX_CHUNK_BYTES for c in chunks)
