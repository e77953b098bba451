"""Transport selection: RDMAKV_TRANSPORT=auto|verbs|tcp|shm (RDMAKV_SHM=0 forbids shm).

auto: verbs when a usable active RDMA port exists, else TCP; shared memory on
top of either for workers and servers on the same host."""
from rdmakv.core.errors import ConfigError, DeviceUnavailable


def _verbs_or_none():
    """(verbs module or None, why)."""
    from rdmakv.transport.verbs import devices as verbs_devices
    usable, reason = verbs_devices.probe()
    if not usable:
        return None, reason
    from rdmakv.transport import verbs
    return verbs, reason


def choose_transport(name):
    """The transport module for a configured name, and why it was chosen."""
    from rdmakv.transport import tcp
    if name == "tcp":
        return tcp, "RDMAKV_TRANSPORT=tcp"
    if name == "verbs":
        verbs, reason = _verbs_or_none()
        if verbs is None:
            raise DeviceUnavailable(f"RDMAKV_TRANSPORT=verbs, but verbs cannot be used here: {reason}")
        return verbs, f"RDMAKV_TRANSPORT=verbs: verbs on {reason}"
    if name in ("auto", "shm"):
        base, base_why = tcp, "TCP"
        if name == "auto":
            verbs, reason = _verbs_or_none()
            base, base_why = (verbs, f"verbs on {reason}") if verbs else (tcp, f"TCP, because verbs cannot be used here: {reason}")
        from rdmakv.transport import shm
        use_shm, why = shm.wanted(name)
        if use_shm:
            return shm.over(base, forced=name == "shm"), f"{why}; {base_why} with the others"
        return base, f"{name}: {base_why} ({why})"
    raise ConfigError(f"unknown transport {name!r} (use auto, verbs, tcp or shm)")
