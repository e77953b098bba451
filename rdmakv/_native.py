"""Import the compiled core, with libibverbs when this machine has it.

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

_flags = sys.getdlopenflags()
sys.setdlopenflags(os.RTLD_LAZY | (_flags & ~os.RTLD_NOW))
try:
    from rdmakv import _transport as transport  # noqa: E402
finally:
    sys.setdlopenflags(_flags)
