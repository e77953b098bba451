"""MRCache over real registrations: eviction really deregisters."""
import numpy as np
import pytest

from rdmakv.core.errors import WorkCompletionError
from rdmakv.transport.verbs import devices as verbs_devices
from rdmakv.transport.verbs.mrcache import MRCache

USABLE, REASON = verbs_devices.probe()
pytestmark = [pytest.mark.rdma, pytest.mark.skipif(not USABLE, reason=f"no usable RDMA device: {REASON}")]

if USABLE:
    from rdmakv.native import transport as t
    REMOTE_W = t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE

KIB64 = 64 * 1024


def test_eviction_deregisters_real_mrs(pair):
    a, b = pair
    src = np.arange(KIB64 // 4, dtype=np.float32)
    src_mr = t.MR(a.pd, src, 0)
    bufs = [bytearray(KIB64) for _ in range(4)]
    with MRCache(b.pd, budget_bytes=3 * KIB64) as cache:
        mrs = [cache.get(buf, REMOTE_W) for buf in bufs[:3]]
        assert len(cache) == 3 and cache.registered_bytes == 3 * KIB64
        assert cache.get(bufs[0], REMOTE_W) is mrs[0]          # hit, and now most recent
        assert cache.get(memoryview(bufs[0]), REMOTE_W) is mrs[0]  # same memory, another object
        other = cache.get(bufs[0], t.IBV_ACCESS_LOCAL_WRITE)     # other access: its own entry
        assert other is not mrs[0]
        assert mrs[1].closed                                      # LRU evicted to make room
        mr3 = cache.get(bufs[3], REMOTE_W)
        assert mrs[2].closed and not mrs[0].closed and not mr3.closed
        assert cache.stats["evictions"] == 2
        bufs[1].extend(b"x")        # evicted: the buffer export was released
        with pytest.raises(BufferError):
            bufs[3].extend(b"x")    # cached: still exported

        # The cached MR works for a real write...
        a.qp.post_write(src_mr, 0, KIB64, mr3.addr, mr3.rkey, wr_id=1)
        assert a.cq.wait(timeout=20)[0].ok
        assert bytes(bufs[3]) == src.tobytes()
    assert mr3.closed and mrs[0].closed and other.closed and len(cache) == 0


def test_evicted_rkey_is_refused(pair):
    a, b = pair
    src = np.ones(1024, np.uint8)
    src_mr = t.MR(a.pd, src, 0)
    victim, newer = bytearray(KIB64), bytearray(KIB64)
    cache = MRCache(b.pd, budget_bytes=KIB64)
    mr = cache.get(victim, REMOTE_W)
    addr, rkey = mr.addr, mr.rkey
    cache.get(newer, REMOTE_W)          # over budget: victim is evicted and deregistered
    assert mr.closed
    a.qp.post_write(src_mr, 0, 1024, addr, rkey, wr_id=9)
    with pytest.raises(WorkCompletionError) as info:
        a.cq.wait(timeout=20)
    assert info.value.wr_id == 9
    assert not any(victim)
    cache.close()


def test_lease_pins_against_eviction(pair):
    a, b = pair
    bufs = [bytearray(KIB64) for _ in range(3)]
    with MRCache(b.pd, budget_bytes=KIB64) as cache:
        with cache.lease(bufs[0], REMOTE_W) as pinned:
            other = cache.get(bufs[1], REMOTE_W)
            assert not pinned.closed and not other.closed   # soft budget: pinned can't go
            cache.get(bufs[2], REMOTE_W)
            assert other.closed and not pinned.closed
        assert pinned.closed          # released and over budget: evicted now
        assert cache.invalidate(bufs[2]) == 1 and len(cache) == 0
