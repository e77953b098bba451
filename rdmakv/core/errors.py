"""rdmakv's exception hierarchy: catch RdmaKVError for anything the library raises.

RdmaKVError
 ├─ ConfigError           a setting is missing or invalid (also a ValueError)
 ├─ ProtocolError         a peer sent bytes that are not a valid rdmakv message
 │   └─ IntegrityError    a frame failed its MAC check (RDMAKV_INTEGRITY)
 ├─ RemoteError           a server or the scheduler refused an operation
 ├─ ClosedError           the KVStore or server was already closed
 └─ TransportError
     ├─ ConnectionClosed  the peer closed the connection or died (EndOfStream: cleanly)
     ├─ PeerTimeout       a peer made no progress within RDMAKV_TIMEOUT (also a TimeoutError)
     ├─ VerbsError        a libibverbs call failed (errno, op, strerror)
     ├─ WorkCompletionError  a work request completed with an error status
     └─ DeviceUnavailable no usable RDMA device or port on this machine
"""
import os


class RdmaKVError(Exception):
    """Base class of every rdmakv error."""


class ConfigError(RdmaKVError, ValueError):
    """A setting (environment variable or keyword argument) is missing or invalid."""


class ProtocolError(RdmaKVError):
    """A peer sent bytes that are not a valid rdmakv message."""


class IntegrityError(ProtocolError):
    """A frame failed its MAC check: altered or replayed on the way, or not sent
    by the authenticated peer (RDMAKV_INTEGRITY)."""


class TransportError(RdmaKVError):
    """Moving bytes to or from a peer failed."""


class ConnectionClosed(TransportError):
    """The peer closed the connection or died."""


class EndOfStream(ConnectionClosed):
    """The peer closed the connection cleanly, between two messages."""


class PeerTimeout(TransportError, TimeoutError):
    """A peer made no progress within RDMAKV_TIMEOUT."""


class RemoteError(RdmaKVError):
    """A server or the scheduler refused an operation; the message says why."""


class ClosedError(RdmaKVError):
    """The KVStore or server was already closed."""


class VerbsError(TransportError):
    """A verbs call failed.  `errno` is the error number the call reported,
    `op` names the call and what it was doing, `strerror` is errno's text."""

    def __init__(self, errno, op, detail=None):
        self.errno = errno
        self.op = op
        self.strerror = os.strerror(errno) if errno else "unknown error"
        self.detail = detail
        msg = f"{op}: {self.strerror} (errno {errno})"
        if detail:
            msg = f"{msg}. {detail}"
        super().__init__(msg)

    def __reduce__(self):
        return (type(self), (self.errno, self.op, self.detail))


class WorkCompletionError(TransportError):
    """A work request finished with a status other than IBV_WC_SUCCESS.
    `status` is the numeric ibv_wc_status, `status_str` its
    ibv_wc_status_str() text, `vendor_err` the device's own code.
    `completions` holds the whole batch the failure arrived in, so callers
    can still account for the successful ones."""

    def __init__(self, status, status_str, vendor_err, wr_id, opcode=None, qp_num=None, completions=()):
        self.status = status
        self.status_str = status_str
        self.vendor_err = vendor_err
        self.wr_id = wr_id
        self.opcode = opcode
        self.qp_num = qp_num
        self.completions = list(completions)
        where = f" on QP {qp_num:#x}" if qp_num is not None else ""
        super().__init__(
            f"work request {wr_id}{where} failed: {status_str} (status {status}, vendor_err {vendor_err:#x})")

    def __reduce__(self):
        return (type(self), (self.status, self.status_str, self.vendor_err, self.wr_id, self.opcode, self.qp_num))


class DeviceUnavailable(TransportError):
    """No RDMA device or port can be used here; the message says why."""
