"""rdmakv: parameter-server push/sum/pull over RDMA verbs or TCP.

    import rdmakv
    with rdmakv.KVStore() as kv:        # configured from DMLC_* / RDMAKV_* variables
        kv.pushpull("grad", array)       # array becomes the sum over all workers
"""
import os
import sys

from rdmakv.core.errors import (ClosedError, ConfigError, ConnectionClosed, PeerTimeout, ProtocolError,
                                RdmaKVError, RemoteError, TransportError)

__version__ = "0.1.0"
__all__ = ["KVStore", "ParameterServer", "has", "RdmaKVError", "ConfigError", "ProtocolError",
           "TransportError", "ConnectionClosed", "PeerTimeout", "RemoteError", "ClosedError"]


def __getattr__(name):
    # Lazy, so `import rdmakv` stays cheap and loads the compiled core only when used.
    if name == "KVStore":
        from rdmakv.worker.kvstore import KVStore
        return KVStore
    if name == "ParameterServer":
        from rdmakv.server.server import ParameterServer
        return ParameterServer
    raise AttributeError(f"module 'rdmakv' has no attribute {name!r}")


def has(feature: str) -> bool:
    """Whether this installation can use a feature: "tcp", "verbs" or "mxnet"."""
    if feature == "tcp":
        from rdmakv.native import transport  # noqa: F401
        return True
    if feature == "verbs":
        from rdmakv.transport.verbs import devices as verbs_devices
        return verbs_devices.probe()[0]
    if feature == "mxnet":
        try:
            import mxnet  # noqa: F401
        except ImportError:
            return False
        return True
    raise ValueError(f"unknown feature {feature!r} (tcp, verbs, mxnet)")


def _refuse_a_script_in_a_node_role():
    """A launcher that starts the same script in every role (dmlc-tracker, an MXJob) makes
    that script's `import mxnet` turn a server or scheduler into MXNet's own ps-lite node,
    which waits for peers that never come.  Where rdmakv is imported first, say what to run.
    rdmakv's own programs import it too: `python -m rdmakv.X` (argv[0] is "-m" while the
    package is imported) and the rdmakv-* commands; `python -c` is left alone as well."""
    from rdmakv.core.config import environ_value
    role = (environ_value("role")[0] or "").strip().lower()
    script = sys.argv[0] if sys.argv else ""
    if role not in ("server", "scheduler") or script in ("", "-c", "-m"):
        return
    name = os.path.basename(script)
    if name.startswith("rdmakv-") and "." not in name:
        return
    raise SystemExit(f"rdmakv: {name} was started as the {role} (DMLC_ROLE={role}), which is rdmakv's own "
                     f"process: start every role with `rdmakv-run python {name} ...`, or run `rdmakv-server` "
                     f"in this role")


_refuse_a_script_in_a_node_role()
