"""Reliable-connected QP setup (policy): the RESET -> INIT -> RTR -> RTS walk.

Each side sends its `local_endpoint()` to the peer out of band (rdmakv uses
its TCP side channel) and calls `connect_rc()` with the peer's dict.  The
path MTU is the smaller of the two ports' active MTUs.
"""
import random

from rdmakv.native import transport as _t

__all__ = ["local_endpoint", "connect_rc", "DEFAULT_ACCESS", "new_psn"]

DEFAULT_ACCESS = _t.IBV_ACCESS_LOCAL_WRITE | _t.IBV_ACCESS_REMOTE_WRITE | _t.IBV_ACCESS_REMOTE_READ

# RC defaults that work on IB, RoCE and rxe (the values rdma-core's pyverbs
# tests and perftest use): ~67 ms local ACK timeout (4.096 us * 2**14),
# 7 retries, 7 RNR retries (7 means "retry forever" for RNR).
TIMEOUT = 14
RETRY_CNT = 7
RNR_RETRY = 7
MIN_RNR_TIMER = 12       # 0.64 ms


def new_psn():
    """A random 24-bit packet sequence number."""
    return random.getrandbits(24)


def _gid_bytes(gid):
    if gid is None:
        return None
    if isinstance(gid, str):
        gid = bytes.fromhex(gid.replace(":", ""))
    gid = bytes(gid)
    if len(gid) != 16:
        raise ValueError(f"a GID is 16 bytes, not {len(gid)}")
    return gid


def local_endpoint(qp, port, psn):
    """What the peer needs to connect to qp: a dict of plain values
    (qpn, psn, lid, gid as 32 hex digits or None, mtu as the ibv_mtu value)."""
    return {"qpn": qp.qp_num, "psn": psn & 0xFFFFFF, "lid": port.lid,
            "gid": port.gid.hex() if port.gid_index is not None else None,
            "mtu": port.active_mtu}


def connect_rc(qp, port, remote, psn, *, access=DEFAULT_ACCESS, timeout=TIMEOUT, retry_cnt=RETRY_CNT,
               rnr_retry=RNR_RETRY, min_rnr_timer=MIN_RNR_TIMER, max_rd_atomic=1, max_dest_rd_atomic=1,
               sl=0, traffic_class=0, hop_limit=64, path_mtu=None):
    """Move an RC QP from RESET (or INIT) to RTS, connected to `remote`
    (a peer's local_endpoint() dict).  `port` is this side's PortInfo and
    `psn` the PSN this side announced.  Raises VerbsError naming the
    transition that failed."""
    for key in ("qpn", "psn", "lid", "mtu"):
        if key not in remote:
            raise ValueError(f"remote endpoint lacks {key!r}: {remote!r}")
    if qp.state == _t.IBV_QPS_RESET:
        qp.modify(_t.IBV_QPS_INIT, pkey_index=0, port_num=port.port, qp_access_flags=access)
    if path_mtu is None:
        path_mtu = min(port.active_mtu, int(remote["mtu"]))
    ah = {"dlid": int(remote["lid"]), "sl": sl, "port_num": port.port}
    dgid = _gid_bytes(remote.get("gid"))
    if port.gid_index is not None:
        if dgid is None:
            raise ValueError("this port is addressed by GID (RoCE) but the remote sent none")
        ah.update(gid=dgid, sgid_index=port.gid_index, hop_limit=hop_limit, traffic_class=traffic_class)
    qp.modify(_t.IBV_QPS_RTR, path_mtu=path_mtu, dest_qp_num=int(remote["qpn"]),
              rq_psn=int(remote["psn"]) & 0xFFFFFF, max_dest_rd_atomic=max_dest_rd_atomic,
              min_rnr_timer=min_rnr_timer, ah=ah)
    qp.modify(_t.IBV_QPS_RTS, timeout=timeout, retry_cnt=retry_cnt, rnr_retry=rnr_retry,
              sq_psn=psn & 0xFFFFFF, max_rd_atomic=max_rd_atomic)
