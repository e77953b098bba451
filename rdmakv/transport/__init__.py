"""Transport selection: RDMAKV_TRANSPORT=auto|verbs|tcp|shm (RDMAKV_SHM=0 forbids shm)."""
from rdmakv.errors import ConfigError


def select(name):
    """The transport module for a configured name, and why it was chosen."""
    if name == "tcp":
        from rdmakv.transport import tcp
        return tcp, "RDMAKV_TRANSPORT=tcp"
    if name in ("auto", "shm"):
        from rdmakv.transport import shm, tcp
        use_shm, why = shm.wanted(name)
        if use_shm:
            return shm.over(tcp, forced=name == "shm"), f"{why}, TCP with the others"
        return tcp, f"auto: TCP ({why}); the verbs transport is not built into this version"
    if name == "verbs":
        raise ConfigError("RDMAKV_TRANSPORT=verbs: the verbs transport is not available in this build")
    raise ConfigError(f"unknown transport {name!r} (use auto, verbs, tcp or shm)")
