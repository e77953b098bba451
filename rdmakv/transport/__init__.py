"""Transport selection: RDMAKV_TRANSPORT=auto|verbs|tcp."""
from rdmakv.errors import ConfigError


def select(name):
    """The transport module for a configured name, and why it was chosen."""
    if name == "tcp":
        from rdmakv.transport import tcp
        return tcp, "RDMAKV_TRANSPORT=tcp"
    if name == "auto":
        from rdmakv.transport import tcp
        return tcp, "auto: the verbs transport is not built into this version"
    if name == "verbs":
        raise ConfigError("RDMAKV_TRANSPORT=verbs: the verbs transport is not available in this build")
    raise ConfigError(f"unknown transport {name!r} (use auto, verbs or tcp)")
