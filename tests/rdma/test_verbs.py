"""Real verbs on a real device (soft-RoCE rxe0 inside the test VM)."""
import ipaddress
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from rdmakv.core.errors import DeviceUnavailable, VerbsError, WorkCompletionError
from rdmakv.transport.verbs import devices as verbs_devices

USABLE, REASON = verbs_devices.probe()
pytestmark = [pytest.mark.rdma, pytest.mark.skipif(not USABLE, reason=f"no usable RDMA device: {REASON}")]

if USABLE:
    from rdmakv.native import transport as t

REMOTE = 0
LOCAL = 0


def wait_one(cq, timeout=20.0):
    wcs = cq.wait(timeout=timeout, max_entries=1)
    assert wcs, f"no completion within {timeout} s"
    return wcs[0]


# --- discovery ------------------------------------------------------------------------

@pytest.fixture
def pyverbs(tmp_path):
    """Debian's pyverbs, importable from any Python 3.11 through a directory
    holding only a symlink to it (see shared/rxe-vm/README.md)."""
    src = "/usr/lib/python3/dist-packages/pyverbs"
    if not os.path.isdir(src):
        pytest.skip("python3-pyverbs is not installed")
    (tmp_path / "pyverbs").symlink_to(src)
    sys.path.insert(0, str(tmp_path))
    try:
        import pyverbs.device
    except ImportError as exc:
        pytest.skip(f"pyverbs does not import here: {exc}")
    yield pyverbs.device
    sys.path.remove(str(tmp_path))


def test_describe_devices_matches_pyverbs(pyverbs):
    ours = verbs_devices.describe_devices()
    theirs = pyverbs.get_device_list()
    def text(x):
        return x.decode() if isinstance(x, bytes) else x

    assert [d["device"] for d in ours] == [text(d.name) for d in theirs]
    for mine, dev in zip(ours, theirs):
        with pyverbs.Context(name=text(dev.name)) as pctx:
            pattr = pctx.query_device()
            assert mine["phys_port_cnt"] == pattr.phys_port_cnt
            assert mine["max_qp"] == pattr.max_qp
            assert mine["max_cqe"] == pattr.max_cqe
            assert mine["vendor_id"] == pattr.vendor_id
            assert len(mine["ports"]) == pattr.phys_port_cnt
            for p in mine["ports"]:
                pport = pctx.query_port(p["port"])
                assert p["state"] == {4: "PORT_ACTIVE", 1: "PORT_DOWN"}.get(pport.state, p["state"])
                assert p["active_mtu"] == verbs_devices.MTU_BYTES[pport.active_mtu]
                assert p["max_mtu"] == verbs_devices.MTU_BYTES[pport.max_mtu]
                assert p["lid"] == pport.lid
                assert p["gid_tbl_len"] == pport.gid_tbl_len
                assert p["link_layer"] == {1: "InfiniBand", 2: "Ethernet"}[pport.link_layer]
                # GID table: same non-zero entries, same bytes, same types.
                pg = {}
                for e in pctx.query_gid_table(pport.gid_tbl_len * pattr.phys_port_cnt):
                    if e.port_num == p["port"]:
                        g = e.gid_str() if callable(e.gid_str) else e.gid_str
                        pg[e.gid_index] = (ipaddress.IPv6Address(text(g)), e.gid_type)
                pg = {i: g for i, g in pg.items() if int(g[0])}
                mg = {g["index"]: (ipaddress.IPv6Address(g["raw"]), g["type"]) for g in p["gids"]}
                assert mg.keys() == pg.keys()
                for i in mg:
                    assert mg[i][0] == pg[i][0]
                    assert mg[i][1] == {0: "IB", 1: "RoCE v1", 2: "RoCE v2"}[pg[i][1]]


def test_select_port_prefers_roce_v2_ipv4(port):
    assert port.port >= 1
    if port.link_layer == "Ethernet":
        assert port.gid_type == "RoCE v2"
        assert ipaddress.IPv6Address(port.gid).ipv4_mapped is not None
        if "RXE_VM_GID_INDEX" in os.environ:
            assert port.gid_index == int(os.environ["RXE_VM_GID_INDEX"])
            assert str(ipaddress.IPv6Address(port.gid).ipv4_mapped) == os.environ["RXE_VM_IP"]


def test_environment_overrides(monkeypatch, port):
    monkeypatch.setenv("RDMAKV_IB_DEVICE", port.device)
    monkeypatch.setenv("RDMAKV_IB_PORT", str(port.port))
    if port.link_layer == "Ethernet":
        other = [g["index"] for d in verbs_devices.describe_devices() if d["device"] == port.device
                 for p in d["ports"] if p["port"] == port.port for g in p["gids"]
                 if g["index"] != port.gid_index]
        if other:
            monkeypatch.setenv("RDMAKV_GID_INDEX", str(other[0]))
            assert verbs_devices.select_port().gid_index == other[0]
        monkeypatch.setenv("RDMAKV_GID_INDEX", "999")
        with pytest.raises(DeviceUnavailable, match="no usable GID at index 999"):
            verbs_devices.select_port()
        monkeypatch.delenv("RDMAKV_GID_INDEX")
    monkeypatch.setenv("RDMAKV_IB_PORT", "77")
    with pytest.raises(DeviceUnavailable, match="has no port 77"):
        verbs_devices.select_port()
    monkeypatch.setenv("RDMAKV_IB_DEVICE", "no_such_dev0")
    with pytest.raises(DeviceUnavailable, match="no_such_dev0"):
        verbs_devices.select_port()
    monkeypatch.undo()
    ok, reason = verbs_devices.probe()
    assert ok and port.device in reason


def test_fork_init_state(device):
    # open_device() (session fixture) ran ensure_fork_init() before any MR.
    state = verbs_devices.ensure_fork_init()
    assert state in ("enabled", "unneeded")
    assert t.is_fork_initialized() == {"enabled": t.IBV_FORK_ENABLED, "unneeded": t.IBV_FORK_UNNEEDED}[state]


# --- data path ------------------------------------------------------------------------

def test_rdma_write_with_imm(pair, arrays):
    a, b = pair
    src, dst = arrays
    src_mr = t.MR(a.pd, src, LOCAL)  # read-only local access: sources need no write rights
    dst_mr = t.MR(b.pd, dst, t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE)
    b.qp.post_recv(None, wr_id=7)  # a WRITE_WITH_IMM consumes one receive, no buffer needed
    offset = 4096
    n = src.nbytes - 2 * offset
    a.qp.post_write(src_mr, offset, n, dst_mr.addr + offset, dst_mr.rkey, wr_id=11, imm=0xDEADBEEF)
    wc = wait_one(a.cq)
    assert (wc.wr_id, wc.opcode, wc.ok) == (11, t.IBV_WC_RDMA_WRITE, True)
    wc = wait_one(b.cq)
    assert wc.ok and wc.wr_id == 7 and wc.opcode == t.IBV_WC_RECV_RDMA_WITH_IMM
    assert wc.imm_data == 0xDEADBEEF
    assert wc.byte_len == n
    assert wc.qp_num == b.qp.qp_num
    view_src, view_dst = src.view(np.uint8), dst.view(np.uint8)
    assert np.array_equal(view_dst[offset:offset + n], view_src[offset:offset + n])
    assert not view_dst[:offset].any() and not view_dst[offset + n:].any()


def test_inline_write_with_imm_and_zero_length(pair):
    a, b = pair
    small = np.arange(16, dtype=np.uint32)          # 64 bytes
    dst = np.zeros(16, np.uint32)
    src_mr = t.MR(a.pd, small, LOCAL)
    dst_mr = t.MR(b.pd, dst, t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE)
    assert a.qp.max_inline_data >= 64
    b.qp.post_recv(None, wr_id=1)
    b.qp.post_recv(None, wr_id=2)
    a.qp.post_write(src_mr, 0, 64, dst_mr.addr, dst_mr.rkey, wr_id=3, imm=5, inline=True)
    small[:] = 0        # inline: the data was copied at post time
    a.qp.post_write(None, 0, 0, dst_mr.addr, dst_mr.rkey, wr_id=4, imm=6)  # immediate only
    got = [wait_one(a.cq).wr_id, wait_one(a.cq).wr_id]
    assert got == [3, 4]
    r1, r2 = wait_one(b.cq), wait_one(b.cq)
    assert (r1.imm_data, r1.byte_len, r2.imm_data, r2.byte_len) == (5, 64, 6, 0)
    assert np.array_equal(dst, np.arange(16, dtype=np.uint32))
    big_mr = t.MR(a.pd, np.zeros(a.qp.max_inline_data + 1, np.uint8), LOCAL)
    with pytest.raises(ValueError, match="max_inline_data"):
        a.qp.post_write(big_mr, 0, None, dst_mr.addr, dst_mr.rkey, inline=True)


def test_send_recv(pair):
    a, b = pair
    rbuf = bytearray(8192)
    rmr = t.MR(b.pd, rbuf, t.IBV_ACCESS_LOCAL_WRITE)
    b.qp.post_recv(rmr, 0, 4096, wr_id=100)
    b.qp.post_recv(rmr, 4096, 4096, wr_id=101)
    small = b"hello over rxe"                       # inline (auto)
    big = np.frombuffer(os.urandom(3000), np.uint8)  # from a registered buffer
    smr = t.MR(a.pd, small, LOCAL)                    # bytes: read-only export
    bmr = t.MR(a.pd, big, LOCAL)
    a.qp.post_send(smr, wr_id=1)
    a.qp.post_send(bmr, wr_id=2, imm=0x01020304, inline=False)
    assert [wait_one(a.cq).wr_id for _ in range(2)] == [1, 2]
    r1, r2 = wait_one(b.cq), wait_one(b.cq)
    assert (r1.wr_id, r1.opcode, r1.byte_len, r1.imm_data) == (100, t.IBV_WC_RECV, len(small), None)
    assert (r2.wr_id, r2.byte_len, r2.imm_data) == (101, 3000, 0x01020304)
    assert bytes(rbuf[:len(small)]) == small
    assert bytes(rbuf[4096:4096 + 3000]) == big.tobytes()


def test_bad_rkey_surfaces_work_completion_error(connect_pair, arrays):
    a, b = connect_pair()
    src, dst = arrays
    src_mr = t.MR(a.pd, src, LOCAL)
    dst_mr = t.MR(b.pd, dst, t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE)
    a.qp.post_write(src_mr, 0, 4096, dst_mr.addr, dst_mr.rkey ^ 0x5A5A00, wr_id=99)
    with pytest.raises(WorkCompletionError) as info:
        a.cq.wait(timeout=20)
    err = info.value
    assert err.wr_id == 99
    assert err.status != t.IBV_WC_SUCCESS
    assert err.status_str == t.wc_status_str(err.status)
    assert "remote access error" in err.status_str or "remote" in str(err)
    assert err.completions and err.completions[0].wr_id == 99
    assert not dst.any()
    # The QP is now in the error state: a new request is refused or flushed
    # with an error status; either way the process lives on.
    try:
        a.qp.post_write(src_mr, 0, 64, dst_mr.addr, dst_mr.rkey, wr_id=100)
    except VerbsError:
        pass
    else:
        wcs = a.cq.wait(timeout=5, check=False)
        assert all(not wc.ok for wc in wcs)
        for wc in wcs:
            with pytest.raises(WorkCompletionError):
                wc.check()
    # A fresh pair on the same device still works.
    c, d = connect_pair()
    s2 = t.MR(c.pd, src, LOCAL)
    d2 = t.MR(d.pd, dst, t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE)
    c.qp.post_write(s2, 0, 4096, d2.addr, d2.rkey, wr_id=1)
    assert wait_one(c.cq).ok
    assert np.array_equal(dst[:1024], src[:1024])


def test_verbs_errors_are_typed(ctx, pair):
    a, _ = pair
    with pytest.raises(VerbsError) as info:
        a.qp.modify(t.IBV_QPS_RTR)     # RTS -> RTR is not a legal transition
    assert info.value.errno and "ibv_modify_qp" in info.value.op
    with pytest.raises(DeviceUnavailable):
        t.Context("no_such_dev0")
    with pytest.raises(TypeError, match="unknown attribute"):
        a.qp.modify(t.IBV_QPS_RTS, bogus=1)
    with pytest.raises(ValueError, match="empty"):
        t.MR(a.pd, bytearray(0))
    with pytest.raises(BufferError):
        t.MR(a.pd, b"read-only", t.IBV_ACCESS_LOCAL_WRITE)   # write access needs a writable buffer
    mr = t.MR(a.pd, bytearray(100))
    with pytest.raises(ValueError, match="outside"):
        a.qp.post_send(mr, 50, 51)


def test_wait_times_out_empty(pair):
    a, _ = pair
    start = time.monotonic()
    assert a.cq.wait(timeout=0.3) == []
    assert 0.25 <= time.monotonic() - start < 5
    cq = t.CQ(a.pd.context, 8)         # no channel: the nap-poll path
    assert cq.wait(timeout=0.05) == []
    cq.close()
    start = time.monotonic()
    assert a.cq.wait(timeout=0.3, spin_us=1e9) == []     # a spin never outlasts the timeout
    assert time.monotonic() - start < 5


def test_memlock_hint(tmp_path):
    """Without CAP_IPC_LOCK and with a small RLIMIT_MEMLOCK, ibv_reg_mr fails and
    the error tells the user which limit to raise."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("prlimit"):
        pytest.skip("needs root, setpriv and prlimit")
    code = (
        "from rdmakv.transport.verbs import devices as vd\n"
        "from rdmakv.native import transport as t\n"
        "from rdmakv.core.errors import VerbsError\n"
        "ctx, port = vd.open_device(); pd = t.PD(ctx)\n"
        "try:\n"
        "    t.MR(pd, bytearray(8 << 20))\n"
        "except VerbsError as e:\n"
        "    print('ERRNO', e.errno); print(e)\n"
        "else:\n"
        "    print('REGISTERED')\n"
        "ctx.close()\n")
    out = subprocess.run(["prlimit", "--memlock=65536:65536", "setpriv", "--bounding-set", "-ipc_lock",
                          "--inh-caps", "-ipc_lock", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERRNO" in out.stdout, out.stdout
    assert "ulimit -l" in out.stdout and "RLIMIT_MEMLOCK" in out.stdout and "65536 bytes" in out.stdout


# --- ownership --------------------------------------------------------------------------

def test_close_is_idempotent_and_children_first():
    ctx2, port = verbs_devices.open_device()
    pd = t.PD(ctx2)
    ch = t.CompChannel(ctx2)
    cq = t.CQ(ctx2, 16, ch)
    qp = t.QP(pd, cq)
    buf = bytearray(4096)
    mr = t.MR(pd, buf, t.IBV_ACCESS_LOCAL_WRITE)
    with pytest.raises(BufferError):
        buf.extend(b"x")           # the MR holds the export: no resize while registered
    assert mr.buffer is buf
    # Closing the PD first must not fail with EBUSY: it closes its QP and MR.
    pd.close()
    assert qp.closed and mr.closed and pd.closed and not cq.closed
    assert mr.buffer is None
    buf.extend(b"x")               # the export is released after dereg
    ctx2.close()
    assert cq.closed and ch.closed and ctx2.closed
    for obj in (qp, mr, pd, cq, ch, ctx2):
        obj.close()                # idempotent
    with pytest.raises(ValueError, match="closed"):
        qp.post_send(None)
    with pytest.raises(ValueError, match="closed"):
        t.PD(ctx2)
    with pytest.raises(ValueError, match="closed"):
        mr.rkey


def test_context_close_tears_down_everything_in_order():
    ctx2, port = verbs_devices.open_device()
    with ctx2:
        pd = t.PD(ctx2)
        cq = t.CQ(ctx2, 16, t.CompChannel(ctx2))
        qps = [t.QP(pd, cq) for _ in range(3)]
        mrs = [t.MR(pd, np.zeros(1024, np.uint8)) for _ in range(3)]
        qps[0].modify(t.IBV_QPS_INIT, pkey_index=0, port_num=port.port, qp_access_flags=0)
    assert ctx2.closed and all(q.closed for q in qps) and all(m.closed for m in mrs) and cq.closed
    del qps, mrs, pd, cq     # the __dealloc__ backstops must not double-free


def test_fork_after_init_keeps_working(pair, arrays):
    a, b = pair
    src, dst = arrays
    src_mr = t.MR(a.pd, src, LOCAL)
    dst_mr = t.MR(b.pd, dst, t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE)
    a.qp.post_write(src_mr, 0, 4096, dst_mr.addr, dst_mr.rkey, wr_id=1)
    assert wait_one(a.cq).ok
    heap_mr = None
    if verbs_devices.ensure_fork_init() == "unneeded":
        # A small heap buffer shares its page with other Python objects; with
        # MADV_DONTFORK (ibv_fork_init on a copy-on-fork kernel) the child
        # would crash on them.  ensure_fork_init() must have avoided that.
        heap_mr = t.MR(a.pd, bytearray(64), t.IBV_ACCESS_LOCAL_WRITE)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            x = np.arange(1 << 16, dtype=np.float64)
            ok = float((x * 2).sum()) == float((1 << 16) * ((1 << 16) - 1))
            a.pd.context.close()   # in the child: forgets handles, must not destroy the parent's
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    # The parent's objects are intact after the child closed its copies.
    dst[:] = 0
    b.qp.post_recv(None, wr_id=5)
    a.qp.post_write(src_mr, 0, src.nbytes, dst_mr.addr, dst_mr.rkey, wr_id=2, imm=77)
    assert wait_one(a.cq).wr_id == 2
    assert wait_one(b.cq).imm_data == 77
    assert np.array_equal(src, dst)
    if heap_mr is not None:
        heap_mr.close()


def test_pingpong_tool_measures_three_ways_of_waiting():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(repo, "tools", "verbs_pingpong.py"), "--count", "10"],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    assert out.count("us one-way") == 3, out
