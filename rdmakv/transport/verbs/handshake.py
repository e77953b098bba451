"""The verbs set-up's messages on the TCP side channel: each side's endpoint
(its QP, and its receive-slot geometry or, for a stream, its ring) as a
framed JSON blob, or a refusal."""
import json
import socket
import struct
import time

from rdmakv.core.errors import ConnectionClosed, PeerTimeout, ProtocolError, TransportError
from rdmakv.transport.verbs.frames import SLOT_BYTES

HANDSHAKE_MAGIC = b"RDKVVRB1"
_WIRE_FIELDS = ("qpn", "psn", "lid", "mtu")
# What each field can be (IBTA: a 24-bit QPN and PSN, a 16-bit LID, enum ibv_mtu 1..5): a value the
# verbs calls cannot take is refused here, by name, not by an OverflowError in the middle of a set-up.
_WIRE_RANGES = {"qpn": range(1 << 24), "psn": range(1 << 24), "lid": range(1 << 16), "mtu": range(1, 6)}
_SLOT_FIELDS = ("slots", "slot_bytes")      # the Python data path's; a stream (stream.py) sends "ring" instead

BLOB_HEAD = len(HANDSHAKE_MAGIC) + 4    # magic, then the length of the JSON that follows
MAX_BLOB_BYTES = 4096


def frame_blob(obj):
    data = json.dumps(obj).encode()
    return HANDSHAKE_MAGIC + struct.pack("<I", len(data)) + data


def recv_exact(sock, n, deadline, what):
    out = bytearray()
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeout(f"{what}: no answer within the time limit")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(out))
        except socket.timeout:
            continue
        if not chunk:
            raise ConnectionClosed(f"{what}: the peer closed the connection during the verbs set-up")
        out += chunk
    return bytes(out)


def blob_length(head, what):
    """The length of the JSON a set-up message's head announces (ProtocolError if it is not one)."""
    if head[:len(HANDSHAKE_MAGIC)] != HANDSHAKE_MAGIC:
        raise ProtocolError(f"{what}: the peer does not speak the rdmakv verbs transport "
                            f"(is it using RDMAKV_TRANSPORT=tcp?)")
    (length,) = struct.unpack("<I", head[len(HANDSHAKE_MAGIC):BLOB_HEAD])
    if length > MAX_BLOB_BYTES:
        raise ProtocolError(f"{what}: set-up message of {length} bytes")
    return length


def decode_blob(body, what):
    """The peer's endpoint from a set-up message's JSON; TransportError if it refused us."""
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"{what}: set-up message is not JSON: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        raise TransportError(f"{what}: refused by the peer: {obj['error'][:200]}")
    if not isinstance(obj, dict) or any(not isinstance(obj.get(k), int) for k in _WIRE_FIELDS):
        raise ProtocolError(f"{what}: set-up message lacks {', '.join(_WIRE_FIELDS)}")
    for field, valid in _WIRE_RANGES.items():
        if obj[field] not in valid:
            raise ProtocolError(f"{what}: {field} {obj[field]} in the set-up message is out of range")
    if obj.get("gid") is not None and not isinstance(obj["gid"], str):
        raise ProtocolError(f"{what}: bad GID in the set-up message")
    if "ring" in obj:
        return obj                  # checked by the stream connection (stream.check_ring)
    if any(not isinstance(obj.get(k), int) for k in _SLOT_FIELDS):
        raise ProtocolError(f"{what}: set-up message lacks {', '.join(_SLOT_FIELDS)}")
    if obj["slot_bytes"] != SLOT_BYTES or not 1 <= obj["slots"] <= 4096:
        raise ProtocolError(f"{what}: the peer uses {obj['slots']} slots of {obj['slot_bytes']} bytes, "
                            f"this side {SLOT_BYTES}-byte slots")
    return obj


def recv_blob(sock, deadline, what):
    length = blob_length(recv_exact(sock, BLOB_HEAD, deadline, what), what)
    return decode_blob(recv_exact(sock, length, deadline, what), what)
