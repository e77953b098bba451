"""How the native engines' codes (rdmakv/native/wire.h, enum rk_error) read
as the exceptions the Python data path raises for the same event, worded as a
TcpConnection or ShmConnection words them: the engines report numbers, the
control plane, which knows the peers' names, turns them into errors."""
import errno
import os

from rdmakv.core import protocol
from rdmakv.core.errors import ConnectionClosed, EndOfStream, PeerTimeout, ProtocolError, RdmaKVError, TransportError
from rdmakv.core.protocol import Op
from rdmakv.native import transport as _t

_CONNECTION_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.ESHUTDOWN,
                      errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}


def engine_stream_error(code, err, what, peer, timeout):
    """The exception a native engine's stream error (wire.h, enum rk_error)
    stands for, worded as TcpConnection would word it."""
    if code == _t.ERR_TIMEOUT:
        return PeerTimeout(f"{what} {peer}: no progress for {timeout:g} s (RDMAKV_TIMEOUT)")
    if code == _t.ERR_EOF:
        return EndOfStream(f"{peer} closed the connection")
    if code == _t.ERR_MIDSTREAM:
        return ConnectionClosed(f"{what} {peer}: the peer closed the connection mid-message")
    if code == _t.ERR_NO_MEMORY:
        return RdmaKVError(f"{what} {peer}: out of memory")
    if code == _t.ERR_CORRUPT:
        return ProtocolError(f"{what} {peer}: the shared ring's counters are inconsistent")
    if code == _t.ERR_SHARED:
        return ProtocolError(f"{what} {peer}: a frame with transport flags this link did not agree to (a "
                             f"shared-memory place or offer, or a verbs result placed where no place was given), "
                             f"or naming memory it never shared")
    if code == _t.ERR_VIA_HOST:
        return ProtocolError(f"{what} {peer}: a push or result flagged as going through the host's root "
                             f"(one push per host) where the job's plan has none")
    if code == _t.ERR_HOST_STALLED:
        return PeerTimeout(f"{what} {peer}: a worker of this host did not take its part in one push per host "
                           f"within {timeout:g} s (RDMAKV_TIMEOUT)")
    kind = ConnectionClosed if err in _CONNECTION_ERRNOS else TransportError
    return kind(f"{what} {peer}: {os.strerror(err)}")


def engine_read_error(code, err, limit, fields, sender, peer, timeout):
    """The exception for what broke a native engine's reader: a message it
    refused (code, limit, the header's fields) from sender, or its stream."""
    header = protocol.Header(*fields[2:])
    if _t.ERR_BAD_MAGIC <= code <= _t.ERR_BAD_DTYPE:
        try:
            protocol.unpack(protocol.HEADER.pack(*fields))
        except ProtocolError as exc:
            return exc
    name = protocol.op_name(header.op)
    if code == _t.ERR_TOO_LARGE:
        if header.op in (Op.HEARTBEAT, Op.RECEIVED):
            return ProtocolError(f"{name} with a payload of {header.length} bytes")
        if header.op == Op.STATES:
            return ProtocolError(f"STATES of {header.length} bytes from {sender}, more than the "
                                 f"{limit} its declared keys' optimizer state can take")
        return ProtocolError(f"{name} payload of {header.length} bytes exceeds the {limit}-byte control limit")
    if code == _t.ERR_UNEXPECTED_RESULT:
        return ProtocolError(f"{sender} sent an unexpected result for key {header.key} "
                             f"chunk {header.chunk} round {header.round}")
    if code == _t.ERR_RESULT_LENGTH:
        return ProtocolError(f"RESULT for key {header.key} chunk {header.chunk} carries {header.length} "
                             f"bytes, expected {limit}")
    return engine_stream_error(code, err, "receive from", peer, timeout)

