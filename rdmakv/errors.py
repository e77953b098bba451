"""rdmakv's exception hierarchy.

RdmaKVError
 └─ TransportError
     ├─ VerbsError            a libibverbs call failed (errno, op, strerror)
     ├─ WorkCompletionError   a work request completed with an error status
     └─ DeviceUnavailable     no usable RDMA device or port on this machine
"""
import os

__all__ = ["RdmaKVError", "TransportError", "VerbsError", "WorkCompletionError", "DeviceUnavailable"]


class RdmaKVError(Exception):
    """Base of every error rdmakv raises on purpose."""


class TransportError(RdmaKVError):
    """Moving bytes between processes failed."""


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
