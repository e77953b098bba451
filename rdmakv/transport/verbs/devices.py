"""RDMA device discovery and port/GID selection (policy; no C here).

Which device, port and GID index rdmakv uses is decided here, from what
libibverbs reports, and can be pinned with environment variables:

RDMAKV_IB_DEVICE   device name, e.g. ``mlx5_0`` or ``rxe0``
RDMAKV_IB_PORT     port number (1-based)
RDMAKV_GID_INDEX   GID table index (RoCE); otherwise picked automatically

Automatic choice: the first ACTIVE port of the first device (in libibverbs'
order).  InfiniBand ports need a LID and are addressed by it.  Ethernet
(RoCE) ports are addressed by GID: prefer a RoCE v2 GID holding an
IPv4-mapped address, then any other RoCE v2 GID, then RoCE v1, never a zero
GID.
"""
import errno as _errno
import ipaddress
import os
import threading
from dataclasses import dataclass
from typing import Optional

from rdmakv.core.config import other_variable
from rdmakv.core.errors import DeviceUnavailable, VerbsError

__all__ = ["PortInfo", "probe", "describe_devices", "select_port", "open_device", "SharedDevice",
           "ensure_fork_init", "MTU_BYTES", "mtu_enum"]

# ibv_mtu enum value -> bytes
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
_PORT_STATES = {0: "PORT_NOP", 1: "PORT_DOWN", 2: "PORT_INIT", 3: "PORT_ARMED", 4: "PORT_ACTIVE",
                5: "PORT_ACTIVE_DEFER"}
_LINK_LAYERS = {0: "Unspecified", 1: "InfiniBand", 2: "Ethernet"}
_GID_TYPES = {0: "IB", 1: "RoCE v1", 2: "RoCE v2"}
PORT_ACTIVE = 4
LINK_LAYER_INFINIBAND = 1
LINK_LAYER_ETHERNET = 2
GID_TYPE_ROCE_V1 = 1
GID_TYPE_ROCE_V2 = 2


def mtu_enum(nbytes):
    """The ibv_mtu value for a byte count (256..4096)."""
    for value, size in MTU_BYTES.items():
        if size == nbytes:
            return value
    raise ValueError(f"{nbytes} is not an RDMA path MTU (256, 512, 1024, 2048 or 4096)")


def _transport():
    """The compiled module, or DeviceUnavailable saying why verbs can't load."""
    from rdmakv import native as _native
    if _native.libibverbs_error is not None:
        raise DeviceUnavailable(f"libibverbs.so.1 could not be loaded: {_native.libibverbs_error}")
    return _native.transport


@dataclass(frozen=True)
class PortInfo:
    """One usable port, with everything a peer needs to address it."""
    device: str
    port: int
    link_layer: str          # "InfiniBand" or "Ethernet"
    lid: int
    gid_index: Optional[int]  # None: address by LID (InfiniBand, no GRH)
    gid: bytes               # 16 raw bytes (zeros when gid_index is None)
    gid_type: Optional[str]
    active_mtu: int          # ibv_mtu enum value
    max_msg_sz: int

    @property
    def mtu_bytes(self):
        return MTU_BYTES[self.active_mtu]

    @property
    def gid_str(self):
        return str(ipaddress.IPv6Address(self.gid))


# --- fork safety ----------------------------------------------------------------------

_fork_lock = threading.Lock()
_fork_state = None


def ensure_fork_init():
    """Make fork() safe for registered memory, once, before any registration.

    Returns 'unneeded' when the kernel copies pinned pages on fork by itself
    (ibv_is_fork_initialized() says IBV_FORK_UNNEEDED; Linux >= 5.13): then
    ibv_fork_init() is deliberately NOT called, because it would still mark
    every registered range MADV_DONTFORK, and a registered buffer sharing a
    page with other heap objects would take those objects out of every child
    (measured in the rxe VM: the child segfaults inside os.fork()).
    Otherwise calls ibv_fork_init() and returns 'enabled', or 'too-late' when
    memory was already registered (EINVAL).  Other failures raise VerbsError.
    With 'enabled', register only dedicated page-aligned buffers: a child
    process cannot touch any page a registration covers."""
    global _fork_state
    with _fork_lock:
        if _fork_state is not None:
            return _fork_state
        t = _transport()
        status = t.is_fork_initialized()
        if status == t.IBV_FORK_UNNEEDED:
            _fork_state = "unneeded"
        elif status == t.IBV_FORK_ENABLED:      # RDMAV_FORK_SAFE was set, or called before
            _fork_state = "enabled"
        else:
            rc = t.fork_init()
            if rc == 0:
                _fork_state = "enabled"
            elif rc == _errno.EINVAL:
                _fork_state = "too-late"
            else:
                raise VerbsError(rc, "ibv_fork_init")
        return _fork_state


# --- discovery ------------------------------------------------------------------------

def _gid_entries(ctx, port, table_len):
    """Non-empty GID entries of a port: [(index, gid bytes, gid_type)]."""
    out = []
    for index in range(table_len):
        try:
            entry = ctx.query_gid_entry(port, index)
        except VerbsError as exc:
            if exc.errno in (_errno.EINVAL, _errno.EOPNOTSUPP, _errno.ENOSYS):
                break  # past the populated table, or no gid_ex support
            raise
        if entry is None or not any(entry["gid"]):
            continue
        out.append((index, entry["gid"], entry["gid_type"]))
    return out


def _rank_gid(gid, gid_type):
    """Sort key for RoCE GID choice: lower is better."""
    addr = ipaddress.IPv6Address(gid)
    v4 = addr.ipv4_mapped is not None
    if gid_type == GID_TYPE_ROCE_V2:
        return 0 if v4 else 1
    if gid_type == GID_TYPE_ROCE_V1:
        return 2 if v4 else 3
    return 4


def _env_int(name):
    raw = other_variable(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DeviceUnavailable(f"{name}={raw!r} is not an integer") from None


def _port_info(ctx, port, gid_index=None):
    """PortInfo for an ACTIVE port of an open Context, or the reason it is unusable."""
    attr = ctx.query_port(port)
    where = f"{ctx.name} port {port}"
    if attr["state"] != PORT_ACTIVE:
        return None, f"{where} is {_PORT_STATES.get(attr['state'], attr['state'])}, not PORT_ACTIVE"
    link = attr["link_layer"]
    if link == LINK_LAYER_ETHERNET:
        entries = _gid_entries(ctx, port, attr["gid_tbl_len"])
        if gid_index is not None:
            chosen = [e for e in entries if e[0] == gid_index]
            if not chosen:
                return None, f"{where} has no usable GID at index {gid_index} (RDMAKV_GID_INDEX)"
        else:
            chosen = sorted(entries, key=lambda e: (_rank_gid(e[1], e[2]), e[0]))
            if not chosen:
                return None, f"{where} (Ethernet) has no non-zero GID; is an IP address set on its netdev?"
        index, gid, gid_type = chosen[0]
        return PortInfo(ctx.name, port, "Ethernet", attr["lid"], index, gid,
                        _GID_TYPES.get(gid_type, str(gid_type)), attr["active_mtu"], attr["max_msg_sz"]), None
    if link in (LINK_LAYER_INFINIBAND, 0):
        if attr["lid"] == 0:
            return None, f"{where} (InfiniBand) has no LID yet; is a subnet manager running?"
        gid = bytes(16)
        if gid_index is not None:
            gid = ctx.query_gid(port, gid_index)
        return PortInfo(ctx.name, port, "InfiniBand", attr["lid"], gid_index, gid,
                        None if gid_index is None else "IB", attr["active_mtu"], attr["max_msg_sz"]), None
    return None, f"{where} has an unknown link layer {link}"


def _candidates(t, device=None, port=None, gid_index=None):
    """Yield (PortInfo or None, reason) for each port considered, in order."""
    device = device if device is not None else other_variable("RDMAKV_IB_DEVICE") or None
    port = port if port is not None else _env_int("RDMAKV_IB_PORT")
    gid_index = gid_index if gid_index is not None else _env_int("RDMAKV_GID_INDEX")
    names = t.get_device_names()
    if not names:
        raise DeviceUnavailable("no RDMA devices")
    if device is not None and device not in names:
        raise DeviceUnavailable(f"RDMA device {device!r} (RDMAKV_IB_DEVICE) not found; found {', '.join(names)}")
    for name in ([device] if device is not None else names):
        with t.Context(name) as ctx:
            nports = ctx.query_device()["phys_port_cnt"]
            ports = [port] if port is not None else range(1, nports + 1)
            for p in ports:
                if not 1 <= p <= nports:
                    yield None, f"{name} has no port {p} (it has {nports})"
                    continue
                yield _port_info(ctx, p, gid_index)


def select_port(device=None, port=None, gid_index=None):
    """The PortInfo to use; arguments override the RDMAKV_* variables, which
    override the automatic choice.  Raises DeviceUnavailable with every
    reason a candidate was rejected."""
    t = _transport()
    reasons = []
    for info, reason in _candidates(t, device, port, gid_index):
        if info is not None:
            return info
        reasons.append(reason)
    raise DeviceUnavailable("no usable RDMA port: " + "; ".join(reasons))


def probe():
    """(usable, reason): can this process use RDMA verbs, and why (not)?"""
    try:
        t = _transport()
        t.get_device_names()
    except DeviceUnavailable as exc:
        return False, str(exc)
    except VerbsError as exc:
        if exc.errno == _errno.ENOSYS:
            return False, "this kernel has no RDMA support (ibv_get_device_list: ENOSYS)"
        return False, f"cannot list RDMA devices: {exc}"
    try:
        info = select_port()
    except (DeviceUnavailable, VerbsError) as exc:
        return False, str(exc)
    gid = f", GID index {info.gid_index} {info.gid_str} ({info.gid_type})" if info.gid_index is not None else ""
    return True, f"{info.device} port {info.port}: {info.link_layer}, LID {info.lid}, MTU {info.mtu_bytes}{gid}"


def describe_devices():
    """Every device and port, roughly what `ibv_devinfo -v` shows, as a list
    of dicts.  Raises VerbsError/DeviceUnavailable when verbs can't be used."""
    t = _transport()
    out = []
    for name in t.get_device_names():
        with t.Context(name) as ctx:
            dev = ctx.query_device()
            ports = []
            for p in range(1, dev["phys_port_cnt"] + 1):
                attr = ctx.query_port(p)
                gids = [{"index": i, "gid": str(ipaddress.IPv6Address(g)), "raw": g,
                         "type": _GID_TYPES.get(gt, str(gt))}
                        for i, g, gt in _gid_entries(ctx, p, attr["gid_tbl_len"])]
                ports.append({
                    "port": p,
                    "state": _PORT_STATES.get(attr["state"], str(attr["state"])),
                    "link_layer": _LINK_LAYERS.get(attr["link_layer"], str(attr["link_layer"])),
                    "max_mtu": MTU_BYTES.get(attr["max_mtu"]),
                    "active_mtu": MTU_BYTES.get(attr["active_mtu"]),
                    "lid": attr["lid"],
                    "sm_lid": attr["sm_lid"],
                    "gid_tbl_len": attr["gid_tbl_len"],
                    "max_msg_sz": attr["max_msg_sz"],
                    "gids": gids,
                })
            out.append({"device": name, "fw_ver": dev["fw_ver"], "node_guid": dev["node_guid"],
                        "sys_image_guid": dev["sys_image_guid"], "vendor_id": dev["vendor_id"],
                        "vendor_part_id": dev["vendor_part_id"], "hw_ver": dev["hw_ver"],
                        "phys_port_cnt": dev["phys_port_cnt"], "max_qp": dev["max_qp"],
                        "max_cqe": dev["max_cqe"], "max_mr_size": dev["max_mr_size"],
                        "max_sge": dev["max_sge"], "ports": ports})
    return out


def open_device(device=None, port=None, gid_index=None):
    """ensure_fork_init(), then select_port() and open that device:
    returns (Context, PortInfo).  The caller owns the Context."""
    ensure_fork_init()
    info = select_port(device, port, gid_index)
    return _transport().Context(info.device), info


class SharedDevice:
    """The device Context and PortInfo, shared by every verbs connection of this
    process and closed when the last one releases it (a forked child opens its own)."""
    _lock = threading.Lock()
    _ctx = None
    _port = None
    _users = 0
    _pid = None

    @classmethod
    def acquire(cls):
        with cls._lock:
            if cls._ctx is None or cls._pid != os.getpid():
                cls._ctx, cls._port = open_device()
                cls._pid = os.getpid()
                cls._users = 0
            cls._users += 1
            return cls._ctx, cls._port

    @classmethod
    def release(cls):
        with cls._lock:
            cls._users -= 1
            if cls._users <= 0 and cls._ctx is not None:
                ctx, cls._ctx, cls._port = cls._ctx, None, None
                ctx.close()
