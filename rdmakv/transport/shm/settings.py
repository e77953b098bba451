"""Whether this process uses shared memory with co-located peers, and with what
ring size and which other uids: policy from RDMAKV_SHM, RDMAKV_SHM_RING_BYTES
and RDMAKV_SHM_ALLOW_UIDS."""
import fcntl
import os
import socket

from rdmakv.core.config import other_variable
from rdmakv.core.errors import ConfigError

MiB = 1 << 20
DEFAULT_RING_BYTES = 16 * MiB
MIN_RING_BYTES = 64 * 1024
MAX_RING_BYTES = 1 << 30
_OFF = ("0", "false", "no", "off")


def ring_bytes(environ=None):
    """The per-direction ring size from RDMAKV_SHM_RING_BYTES (a power of two)."""
    text = other_variable("RDMAKV_SHM_RING_BYTES", environ) or ""
    if text == "":
        return DEFAULT_RING_BYTES
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"RDMAKV_SHM_RING_BYTES={text!r} is not an integer") from None
    if not MIN_RING_BYTES <= value <= MAX_RING_BYTES or value & (value - 1):
        raise ConfigError(f"RDMAKV_SHM_RING_BYTES={value} must be a power of two between "
                          f"{MIN_RING_BYTES} and {MAX_RING_BYTES}")
    return value


def allowed_uids(environ=None):
    """The uids whose processes may share memory with this one: its own, and
    those listed in RDMAKV_SHM_ALLOW_UIDS (comma-separated numbers)."""
    text = other_variable("RDMAKV_SHM_ALLOW_UIDS", environ) or ""
    try:
        listed = {int(part) for part in text.replace(",", " ").split()}
    except ValueError:
        raise ConfigError(f"RDMAKV_SHM_ALLOW_UIDS={text!r}: list numeric uids, separated by commas") from None
    if any(uid < 0 for uid in listed):
        raise ConfigError(f"RDMAKV_SHM_ALLOW_UIDS={text!r}: uids are >= 0")
    return frozenset(listed | {os.getuid()})


def unavailable():
    """Why shared memory cannot work in this process, or None."""
    if not hasattr(os, "memfd_create") or not hasattr(socket, "send_fds") or not hasattr(fcntl, "F_ADD_SEALS"):
        return "this Python lacks memfd_create, SCM_RIGHTS helpers or file seals"
    return None


def forbidden(environ=None):
    """Whether RDMAKV_SHM=0 forbids shared memory to this process."""
    return (other_variable("RDMAKV_SHM", environ) or "").strip().lower() in _OFF


def wanted(transport, environ=None):
    """(whether connections to co-located peers use shared memory, why), for a
    configured transport name.  RDMAKV_SHM=0 forbids it; RDMAKV_TRANSPORT=shm
    demands it (set-up failures with a co-located peer are then errors, not
    a quiet fall-back)."""
    off = forbidden(environ)
    if transport == "shm":
        if off:
            raise ConfigError("RDMAKV_TRANSPORT=shm contradicts RDMAKV_SHM=0")
        missing = unavailable()
        if missing:
            raise ConfigError(f"RDMAKV_TRANSPORT=shm: {missing}")
        ring_bytes(environ)
        allowed_uids(environ)
        return True, "RDMAKV_TRANSPORT=shm: shared memory with co-located peers"
    if transport != "auto":
        return False, f"RDMAKV_TRANSPORT={transport}"
    if off:
        return False, "RDMAKV_SHM=0"
    missing = unavailable()
    if missing:
        return False, f"no shared memory: {missing}"
    ring_bytes(environ)
    allowed_uids(environ)
    return True, "auto: shared memory with co-located peers"
