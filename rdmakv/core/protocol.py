"""The rdmakv wire format: a fixed 48-byte, versioned, little-endian header,
then `length` payload bytes.

Control messages carry UTF-8 JSON payloads; tensor messages carry raw array
bytes.  Nothing received is ever unpickled or evaluated."""
import json
import struct
from collections import namedtuple

from rdmakv.core.errors import ProtocolError

MAGIC = 0x564B4452           # b"RDKV" read as little-endian u32
VERSION = 1
MAX_CONTROL_BYTES = 1 << 20  # a JSON control payload is never larger
MAX_CONNECT_BYTES = 4096     # a CONNECT: the only payload taken from a peer that has not connected
MAX_CHUNK_BYTES = 1 << 30    # a key's chunks are never larger (so partition_bytes above is cut to it)
MAX_KEY_CHUNKS = 1 << 18     # a key is never split into more chunks (declaring one costs O(chunks))

# magic, version, op, dtype, flags, key, chunk, priority, round, length, sender
HEADER = struct.Struct("<IHBBIQIiQQI")
HEADER_SIZE = HEADER.size
FLAGS_OFFSET = struct.calcsize("<IHBB")   # where the u32 flags sit in a packed header

Header = namedtuple("Header", "op dtype flags key chunk priority round length sender")


class Op:
    # node <-> scheduler
    HELLO = 1          # json {role, host, port, node_id (the rank asked for, or null), hostname}
    WELCOME = 2        # json {rank, num_workers, num_servers, servers, ...}
    BARRIER = 3
    BARRIER_DONE = 4
    GOODBYE = 5        # a worker is done
    SHUTDOWN = 6       # scheduler tells a server to stop
    # worker <-> server
    CONNECT = 10       # json {rank}
    DECLARE = 11       # json {key, name, dtype, shape, chunk_bytes, compression}: see declaration()
    PUSH = 12          # payload: one chunk of the worker's tensor
    RESULT = 13        # payload: one chunk of the sum (or updated weight)
    INIT = 14          # payload: one chunk of the initial value (rank 0)
    SET_OPTIMIZER = 15  # json optimizer description
    GET_STATES = 16
    STATES = 17        # payload: optimizer state bytes
    SET_STATES = 18    # payload: optimizer state bytes
    ACK = 19
    RECEIVED = 20      # the server has a push that asked for FLAG_ACK: its credit may come back
    WAITING = 21       # json {missing}: a round open for RDMAKV_TIMEOUT/2 still lacks these workers' pushes
    # any direction
    ERROR = 30         # json {message, key?}
    HEARTBEAT = 31     # no payload: the sender is alive (control.peer.Peer)
    # connection handshake (rdmakv.control.auth)
    CHALLENGE = 40     # json {nonce, auth, integrity}
    AUTH = 41          # json {nonce, mac, integrity}
    AUTH_OK = 42       # json {mac}

    NAMES = {}


Op.NAMES = {v: k for k, v in vars(Op).items() if isinstance(v, int)}

# Header flags
FLAG_BROADCAST = 1     # only the root's payload counts in this round
FLAG_NO_DATA = 2       # a broadcast contribution from a non-root: header only
FLAG_ACK = 4           # answer RECEIVED once this push is in (it holds scheduling credit)
# One push per host (rdmakv/control/hierarchy.py): a push whose bytes went into the host's sum, or a
# result the worker copies from there (no bytes follow); only the native engines take it.
FLAG_VIA_HOST = 8
KNOWN_FLAGS = FLAG_BROADCAST | FLAG_NO_DATA | FLAG_ACK | FLAG_VIA_HOST
# On a header handed to a transport or delivered by one, never accepted from the
# wire: the sender already wrote the payload into the region the receiver
# exposed under the message's tag stream (Connection.expose), so no payload
# bytes follow (what that write was, a sum, is rdmakv.server.summing's business).
FLAG_IN_PLACE = 1 << 8

# Codes shared with the reduction kernel in _reduce.pxi.
DTYPE_CODES = {
    "float16": 1, "float32": 2, "float64": 3,
    "int8": 4, "uint8": 5, "int32": 6, "int64": 7,
}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}


def pack(op, *, dtype=0, flags=0, key=0, chunk=0, priority=0, round=0, length=0, sender=0):
    return HEADER.pack(MAGIC, VERSION, op, dtype, flags, key, chunk, priority, round, length, sender)


def unpack(data):
    """Parse and validate the fixed part of a header; raise ProtocolError naming the bad field."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    magic, version, op, dtype, flags, key, chunk, priority, rnd, length, sender = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:08x}: not an rdmakv peer")
    if version != VERSION:
        raise ProtocolError(f"wire version {version} is not supported (this side speaks {VERSION})")
    if op not in Op.NAMES:
        raise ProtocolError(f"unknown op {op}")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown flags 0x{flags:x}")
    if dtype and dtype not in DTYPE_NAMES:
        raise ProtocolError(f"unknown dtype code {dtype}")
    return Header(op, dtype, flags, key, chunk, priority, rnd, length, sender)


# Tags: what transports match messages by (rdmakv/transport/base.py), without
# knowing ops, keys or rounds.  A message's tag is a `stream` (its op, key and
# chunk, as one integer of TAG_STREAM_BYTES little-endian bytes: the byte
# layout of those three header fields) and a `sequence` (its round) that numbers
# the messages of the stream.
TAG_STREAM_BYTES = 13


class Tag(namedtuple("Tag", "stream sequence")):
    __slots__ = ()

    def __str__(self):
        op, key, chunk = self.stream & 0xFF, (self.stream >> 8) & 0xFFFFFFFFFFFFFFFF, self.stream >> 72
        return f"{op_name(op)} key {key} chunk {chunk} round {self.sequence}"


def tag(op, key, chunk, round):
    """The tag of the (op, key, chunk) message of `round`."""
    return Tag(op | key << 8 | chunk << 72, round)


def tag_of(header):
    """The tag of a Header."""
    return Tag(header.op | header.key << 8 | header.chunk << 72, header.round)


def tag_of_frame(data):
    """The tag of a packed header (its fields unchecked)."""
    _, _, op, _, _, key, chunk, _, rnd, _, _ = HEADER.unpack_from(data)
    return Tag(op | key << 8 | chunk << 72, rnd)


def tagged_header(tag, length):
    """A header that names only a tag and a length (a transport's own frame about a tag)."""
    stream = tag.stream
    return pack(stream & 0xFF, key=(stream >> 8) & 0xFFFFFFFFFFFFFFFF, chunk=stream >> 72, round=tag.sequence,
                length=length)


def encode_json(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(payload):
    """Decode a control payload; it must be a JSON object."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control payload of {len(payload)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        obj = json.loads(bytes(payload).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:   # RecursionError: deep nesting
        raise ProtocolError(f"control payload is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control payload is not a JSON object")
    return obj


def declaration(key, name, dtype, shape, chunk_bytes, compression=None):
    """A DECLARE payload.  It carries what the chunks follow from, not the
    chunks: chunk_bytes (the size of every chunk but the last, from
    rdmakv.core.partition.chunk_size).  Servers recompute the chunks and their
    placement (rdmakv.core.partition.place: a pure function of the key), so the
    payload's size never grows with the chunk count.  compression: the key's
    (rdmakv.core.compression.Compression.wire()), or None."""
    return encode_json({"key": key, "name": name, "dtype": dtype, "shape": list(shape),
                        "chunk_bytes": chunk_bytes, "compression": compression})


def state_limit(declared_bytes, declared_chunks):
    """The largest SET_STATES a server takes for this much declared data: a
    supported optimizer keeps at most 8 bytes of state per weight byte (FTML or
    centered RMSProp on float16 weights: a float32 master copy and three float32
    states), plus a JSON entry per chunk."""
    return 8 * declared_bytes + 1024 * declared_chunks + MAX_CONTROL_BYTES


MAX_PEER_TEXT = 1000       # characters of a peer's free text (an ERROR's message) that we repeat


def peer_text(obj, field="message", default="no reason given"):
    """obj[field], a free text a peer sent, made safe to log and to pass on:
    control and other unprintable characters (escape sequences, bidi overrides)
    written as escapes, cut to MAX_PEER_TEXT characters."""
    value = obj.get(field, default)
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if len(text) > MAX_PEER_TEXT:
        text = f"{text[:MAX_PEER_TEXT]}... ({len(text) - MAX_PEER_TEXT} more characters)"
    return text


def op_name(op):
    return Op.NAMES.get(op, str(op))
