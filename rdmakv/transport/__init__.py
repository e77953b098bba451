"""Transport selection: RDMAKV_TRANSPORT=auto|verbs|tcp."""
from rdmakv.errors import ConfigError, DeviceUnavailable


def select(name):
    """The transport module for a configured name, and why it was chosen.

    tcp: TCP.  verbs: the verbs transport, or DeviceUnavailable with the
    reason this machine can't run it.  auto: verbs where a usable active
    RDMA port exists (verbs_devices.probe()), else TCP."""
    if name == "tcp":
        from rdmakv.transport import tcp
        return tcp, "RDMAKV_TRANSPORT=tcp"
    if name in ("verbs", "auto"):
        from rdmakv.transport import verbs_devices
        usable, reason = verbs_devices.probe()
        if usable:
            from rdmakv.transport import verbs
            return verbs, f"{'auto: ' if name == 'auto' else 'RDMAKV_TRANSPORT=verbs: '}verbs on {reason}"
        if name == "verbs":
            raise DeviceUnavailable(f"RDMAKV_TRANSPORT=verbs, but verbs cannot be used here: {reason}")
        from rdmakv.transport import tcp
        return tcp, f"auto: TCP, because verbs cannot be used here: {reason}"
    raise ConfigError(f"unknown transport {name!r} (use auto, verbs or tcp)")
