"""The native mechanism: the extension's sources (_transport.pyx includes the
.pxi files; .pxd declarations, .h C) compiled into rdmakv.native._transport.
This module imports it, with libibverbs when this machine has it.

The extension is built without a hard dependency on libibverbs.so.1 (see
setup.py): the library is loaded here with RTLD_GLOBAL, and the extension is
imported with lazy binding, so the TCP path works where rdma-core is absent and
the verbs path reports why it cannot run instead of failing at import."""
import ctypes
import os
import sys

LIBIBVERBS = "libibverbs.so.1"


def _load_libibverbs():
    try:
        ctypes.CDLL(LIBIBVERBS, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return str(exc)
    return None


libibverbs_error = _load_libibverbs()
"""None when libibverbs.so.1 was loaded, else the loader's reason."""



def _unbuilt_source_tree():
    """The explanation when this rdmakv is a source checkout whose extension was never built."""
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(os.path.join(here, "_transport.pyx")):
        return None
    if any(name.startswith("_transport.") and name.endswith(".so") for name in os.listdir(here)):
        return None
    tree = os.path.dirname(os.path.dirname(here))
    return (f"{tree} is a source tree without its built extension (rdmakv.native._transport), "
            f"and Python found rdmakv there first: `pip install -e .` builds it in place, or run from another "
            f"directory to use the installed rdmakv")


_flags = sys.getdlopenflags()
sys.setdlopenflags(os.RTLD_LAZY | (_flags & ~os.RTLD_NOW))
try:
    from rdmakv.native import _transport as transport  # noqa: E402
except ImportError as exc:
    explanation = _unbuilt_source_tree()
    if explanation is None:
        raise
    raise ImportError(explanation, name="rdmakv.native._transport") from exc
finally:
    sys.setdlopenflags(_flags)
