"""Host-side checks of the verbs layer: these run everywhere, RDMA or not."""
import errno
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rdmakv.core.errors import DeviceUnavailable, RdmaKVError, TransportError, VerbsError, WorkCompletionError
from rdmakv.transport.verbs import devices as verbs_devices
from rdmakv.transport.verbs.mrcache import MRCache, buffer_span


def test_extension_imports_and_probe_explains():
    from rdmakv import native as _native
    from rdmakv.native import transport
    assert _native.libibverbs_error is None, "rdma-core's libibverbs1 is installed on the dev/CI images"
    assert transport.HAVE_LIBIBVERBS
    usable, reason = verbs_devices.probe()
    assert isinstance(reason, str) and reason
    if not usable and not os.environ.get("RXE_VM"):
        assert reason in ("this kernel has no RDMA support (ibv_get_device_list: ENOSYS)", "no RDMA devices") \
            or reason.startswith("no usable RDMA port")


def test_no_rdma_kernel_is_reported_not_raised():
    from rdmakv.native import transport
    try:
        names = transport.get_device_names()
    except VerbsError as exc:
        assert exc.errno == errno.ENOSYS and exc.op == "ibv_get_device_list"
        assert "ENOSYS" in verbs_devices.probe()[1]
        with pytest.raises(VerbsError):
            transport.Context()
    else:
        if not names:
            assert verbs_devices.probe() == (False, "no RDMA devices")


def test_imports_without_libibverbs():
    """The TCP path and the reduction kernel work where libibverbs.so.1 is
    absent; verbs entry points raise DeviceUnavailable instead of killing the
    process with a symbol lookup error."""
    code = r"""
import ctypes
real = ctypes.CDLL
def fake(name, *a, **k):
    if "ibverbs" in str(name):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")
    return real(name, *a, **k)
ctypes.CDLL = fake
import numpy as np
from rdmakv import native as _native
from rdmakv.core.errors import DeviceUnavailable
from rdmakv.native import transport as t
from rdmakv.transport.verbs import devices as verbs_devices
assert _native.libibverbs_error and "No such file" in _native.libibverbs_error
assert not t.HAVE_LIBIBVERBS
a = np.ones(8, np.float32); t.add_into(a, np.ones(8, np.float32), 2); assert a.sum() == 16
for f in (t.get_device_names, t.Context, t.fork_init):
    try:
        f()
    except DeviceUnavailable as e:
        pass
    else:
        raise SystemExit(f"{f} did not raise")
usable, reason = verbs_devices.probe()
assert not usable and "libibverbs.so.1 could not be loaded" in reason, reason
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_error_hierarchy_and_messages():
    e = VerbsError(errno.ENOMEM, "ibv_reg_mr", "raise `ulimit -l`")
    assert isinstance(e, TransportError) and isinstance(e, RdmaKVError)
    assert (e.errno, e.op, e.strerror) == (errno.ENOMEM, "ibv_reg_mr", os.strerror(errno.ENOMEM))
    assert "ibv_reg_mr" in str(e) and "ulimit -l" in str(e)
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.errno, e2.op, str(e2)) == (e.errno, e.op, str(e))
    w = WorkCompletionError(10, "remote access error", 0x1234, 99, qp_num=0x11)
    assert isinstance(w, TransportError)
    assert "remote access error" in str(w) and "99" in str(w) and "0x1234" in str(w)
    assert pickle.loads(pickle.dumps(w)).wr_id == 99
    assert issubclass(DeviceUnavailable, TransportError)


def test_buffer_span():
    a = np.zeros((4, 8), np.float64)
    assert buffer_span(a) == (a.ctypes.data, a.nbytes)
    assert buffer_span(memoryview(a)[1:]) == (a.ctypes.data + 64, a.nbytes - 64)
    with pytest.raises(ValueError):
        buffer_span(a[:, ::2])


# --- MRCache policy, as a property ------------------------------------------------------
# The real registrations are tested in tests/rdma/test_mrcache_verbs.py inside
# the VM; here a recording register function lets hypothesis explore the
# policy (LRU order, budget, leases, close) quickly.

class Recorder:
    """A registration that only records whether it was closed, and how often."""

    live = set()

    def __init__(self, buf, access):
        self.span = buffer_span(buf)
        self.access = access
        self.closes = 0
        Recorder.live.add(self)

    def close(self):
        self.closes += 1
        Recorder.live.discard(self)


ops = st.lists(st.tuples(st.sampled_from(["get", "lease", "invalidate"]), st.integers(0, 7),
                         st.sampled_from([1, 3])), max_size=40)


@settings(deadline=None, max_examples=150)
@given(ops=ops, budget=st.integers(1, 12))
def test_mrcache_properties(ops, budget):
    Recorder.live = set()
    unit = 4096
    buffers = [bytearray(unit * (1 + i % 3)) for i in range(8)]
    cache = MRCache(Recorder, budget_bytes=budget * unit)
    order = []   # our model of LRU order: keys, oldest first
    for op, i, access in ops:
        buf = buffers[i]
        key = (*buffer_span(buf), access)
        if op == "invalidate":
            cache.invalidate(buf)
            order = [k for k in order if k[0] != key[0]]
        else:
            if op == "get":
                mr = cache.get(buf, access)
            else:
                with cache.lease(buf, access) as mr:
                    assert not mr.closes
            assert mr.span == key[:2] and mr.access == access
            if key in order:
                order.remove(key)
            order.append(key)
            order = [k for k in order if k in cache]
        # Invariants: the cache holds exactly the live registrations, counts
        # their bytes, closes each evicted one once, keeps LRU order, and is
        # within budget unless a single entry alone exceeds it.
        assert set(cache.keys()) == {(*r.span, r.access) for r in Recorder.live}
        assert cache.registered_bytes == sum(r.span[1] for r in Recorder.live)
        assert cache.keys() == [k for k in order if k in cache]
        assert cache.registered_bytes <= cache.budget_bytes or len(cache) == 1
    every = list(Recorder.live)
    cache.close()
    cache.close()
    assert not Recorder.live and all(r.closes == 1 for r in every)
    with pytest.raises(ValueError):
        cache.get(buffers[0], 1)


def test_a_stream_peer_s_ring_is_checked_before_anything_is_pinned_for_it():
    """A set-up message names the peer's ring; what does not fit a verbs call,
    or asks us to pin another size than ours, is refused by name."""
    from rdmakv.core.errors import ProtocolError
    from rdmakv.transport.verbs.stream import RING_BYTES, check_ring
    assert check_ring({"ring": [4096, 7, RING_BYTES]}, "set-up") == [4096, 7, RING_BYTES]
    for ring in ([0, 1 << 32, RING_BYTES], [1 << 64, 1, RING_BYTES], [0, 1, 64 << 20], [0, 1, RING_BYTES + 1],
                 [0, -1, RING_BYTES], [0.5, 1, RING_BYTES], [True, 1, RING_BYTES], "x", None, [0, 1]):
        with pytest.raises(ProtocolError, match="ring"):
            check_ring({"ring": ring}, "set-up")


@pytest.mark.parametrize("field, value", [("qpn", 1 << 24), ("psn", -1), ("lid", 1 << 16), ("mtu", 0), ("mtu", 6),
                                          ("qpn", 1 << 70)])
def test_a_set_up_message_s_fields_out_of_range_are_refused_by_name(field, value):
    import json
    from rdmakv.core.errors import ProtocolError
    from rdmakv.transport.verbs.handshake import decode_blob
    good = {"qpn": 17, "psn": 5, "lid": 0, "mtu": 5, "gid": None, "ring": [4096, 7, 2 << 20]}
    assert decode_blob(json.dumps(good), "set-up")["qpn"] == 17
    with pytest.raises(ProtocolError, match=f"{field} {value} in the set-up message is out of range"):
        decode_blob(json.dumps(dict(good, **{field: value})), "set-up")
