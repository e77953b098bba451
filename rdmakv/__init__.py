"""rdmakv: parameter-server push/sum/pull over RDMA verbs or TCP.

    import rdmakv
    with rdmakv.KVStore() as kv:        # configured from DMLC_* / RDMAKV_* variables
        kv.pushpull("grad", array)       # array becomes the sum over all workers
"""
from rdmakv.errors import (ClosedError, ConfigError, ConnectionClosed, PeerTimeout, ProtocolError,
                           RdmaKVError, RemoteError, TransportError)

__version__ = "0.1.0"
__all__ = ["KVStore", "ParameterServer", "has", "RdmaKVError", "ConfigError", "ProtocolError",
           "TransportError", "ConnectionClosed", "PeerTimeout", "RemoteError", "ClosedError"]


def __getattr__(name):
    # Lazy, so `import rdmakv` stays cheap and loads the compiled core only when used.
    if name == "KVStore":
        from rdmakv.kvstore import KVStore
        return KVStore
    if name == "ParameterServer":
        from rdmakv.server import ParameterServer
        return ParameterServer
    raise AttributeError(f"module 'rdmakv' has no attribute {name!r}")


def has(feature: str) -> bool:
    """Whether this installation can use a feature: "tcp", "verbs" or "mxnet"."""
    if feature == "tcp":
        from rdmakv._native import transport  # noqa: F401
        return True
    if feature == "verbs":
        from rdmakv.transport import verbs_devices
        return verbs_devices.probe()[0]
    if feature == "mxnet":
        try:
            import mxnet  # noqa: F401
        except ImportError:
            return False
        return True
    raise ValueError(f"unknown feature {feature!r} (tcp, verbs, mxnet)")
