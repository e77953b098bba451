"""Shared memory between co-located peers: a layer over another transport
(TCP, or verbs) that moves a connection's bytes through memory both processes
map whenever the two ends run on the same host, and hands every other
connection to the transport underneath.

Who may use it.  Any local user can reach an abstract socket, so both sides
ask the kernel who is at the other end (SO_PEERCRED) before any memory
changes hands, and refuse a process of another uid unless
RDMAKV_SHM_ALLOW_UIDS names it.  The listener runs every set-up alongside
its other work, each with its own short deadline (SETUP_SECONDS) and within
caps per uid and in total, so a silent or slow local process costs others
nothing; refusals are logged within a budget.

Set-up.  A listener also listens on an abstract Unix socket named after its
own address ("rdmakv-shm/<numeric host>/<port>").  Abstract names live in the
kernel's network namespace and vanish with the socket, so reaching one proves
the listener shares this kernel (same host, same network namespace) and
leaves no file behind, ever.  The connector tries that name first; where
nothing answers (another host, a plain TCP listener such as the scheduler,
RDMAKV_SHM=0 there) it connects with the transport underneath instead.  On a
hit the connector creates the segment as an anonymous memory file
(memfd_create, sealed against shrinking, so the peer can never make our
mapping fault), passes its fd over the socket (SCM_RIGHTS) with the ring size,
and both sides map it and close the fd: there is no name in /dev/shm at any
moment, and the kernel frees the memory once both mappings are gone, crash or
not.  The Unix socket stays open and silent: any event on it means the peer's
process is gone.

Data path.  Two single-producer/single-consumer byte rings, one per
direction (rdmakv/native/_shm.h): the sender copies header and payload in, the
receiver copies straight out into the destination buffer, in pieces, so a
large payload streams through a ring of any size.  Acquire/release counters,
futex sleeps only when a side has nothing to do, every wait bounded.

Shared results.  A listener also keeps an arena of memory files that the
server's round buffers are allocated from (shared_buffer), each after a sum
control block.  A payload of at least SHARED_MIN_BYTES that lies in the arena
is not copied into the ring: the first time a connection needs a segment its
fd goes over the Unix socket, and the ring carries the header (flagged
SHARED_PAYLOAD, a bit only this layer uses and strips) and the payload's
place.  The receiver copies straight from the mapping into the destination,
so the server writes a sum once for all its co-located workers instead of
once into each worker's ring.  This is
safe because the protocol already keeps a round's result buffer unchanged
until every worker has its copy: it is reused two rounds later, and the next
round cannot complete before each worker has received this one.

Shared sums.  The same buffers take the pushes of co-located workers
directly: offer_sum sends the worker the places of a chunk's two round
buffers (mapped writable on its side), and its push of round r is then added
into buffer r % 2 by the worker itself, under the lock in the buffer's
control block (_shm.h), before only the header crosses the ring, flagged
SUMMED.  The server adds pushes that reach it any other way under the same
lock (ShmListener.sum_into), so the first contribution of a round copies and
every later one adds, whoever makes it.  A worker pushes round r only after
its round r - 1 completed, so every worker has copied round r - 2's result
out of that buffer by then.  Co-located workers can thus write into the
server's round buffers: same-user processes holding the cluster secret are
trusted that far (RDMAKV_SHM=0 on a worker keeps it out).

The stream carries exactly what the TCP transport carries, so authentication,
the KVStore and the server run over it unchanged."""
import errno
import fcntl
import json
import logging
import math
import mmap
import os
import select
import socket
import struct
import threading
import time

import numpy as np

from rdmakv.core import netif, protocol
from rdmakv.core.errors import ConfigError, ConnectionClosed, EndOfStream, PeerTimeout, ProtocolError, TransportError
from rdmakv.core.protocol import Op
from rdmakv.native import transport as _t
from rdmakv.transport.base import Connection, Listener, Throttle

log = logging.getLogger("rdmakv.transport.shm")

MiB = 1 << 20
DEFAULT_RING_BYTES = 16 * MiB
MIN_RING_BYTES = 64 * 1024
MAX_RING_BYTES = 1 << 30
SETUP_SECONDS = 3.0            # a connector sends its set-up at once: one that has not by then is refused
ANSWER_SECONDS = 2 * SETUP_SECONDS  # how long a connector waits for the answer (the listener may be busy)
MAX_SETUPS = 64                # set-ups in progress at a listener (beyond: refused at once) ...
MAX_SETUPS_PER_UID = 32        # ... and from one uid
SETUP_VERSION = 1
_OFF = ("0", "false", "no", "off")

SHARED_MIN_BYTES = 64 * 1024   # smaller payloads are cheaper to copy through the ring
SUM_CONTROL_BYTES = _t.SUM_CONTROL_BYTES
ARENA_SEGMENT_BYTES = 64 * MiB  # the arena's first memory file; each next one is as large as all before
ARENA_ALIGN = 4096
MAX_SHARED_SEGMENTS = 4096     # a peer sharing more is refused (each costs us a mapping)
# Header flag bits private to this layer (stripped on receipt):
SHARED_PAYLOAD = 1 << 31       # a PLACE follows, not the bytes
SUM_OFFER = 1 << 30            # not a message: a SUM_PLACES follows (offer_sum)
SUMMED = 1 << 29               # a push already added into the offered sum: no bytes follow
PRIVATE_FLAGS = SHARED_PAYLOAD | SUM_OFFER | SUMMED
_FLAGS = struct.Struct("<I")
SEGMENT = struct.Struct("<IQ")  # sent with a segment's fd: its number and size
PLACE = struct.Struct("<IQ")    # in the ring instead of the payload: segment number, offset
SUM_PLACES = struct.Struct("<IQIQQ")  # a sum's two round buffers (segment, offset each) and its size


def ring_bytes(environ=None):
    """The per-direction ring size from RDMAKV_SHM_RING_BYTES (a power of two)."""
    environ = os.environ if environ is None else environ
    text = environ.get("RDMAKV_SHM_RING_BYTES", "")
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
    environ = os.environ if environ is None else environ
    text = environ.get("RDMAKV_SHM_ALLOW_UIDS", "")
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


def wanted(transport, environ=None):
    """(whether connections to co-located peers use shared memory, why), for a
    configured transport name.  RDMAKV_SHM=0 forbids it; RDMAKV_TRANSPORT=shm
    demands it (set-up failures with a co-located peer are then errors, not
    a quiet fall-back)."""
    environ = os.environ if environ is None else environ
    off = environ.get("RDMAKV_SHM", "").strip().lower() in _OFF
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


def _endpoint(host, port):
    """The abstract socket name of the listener at (host, port), or None if host does not resolve."""
    try:
        _, sockaddr = netif.resolve(host, port)
    except Exception:  # noqa: BLE001 - the transport underneath reports a bad address
        return None
    return f"\0rdmakv-shm/{sockaddr[0]}/{sockaddr[1]}".encode()


def _peer_credentials(sock):
    """(pid, uid) of the process at the other end of a Unix socket, from the kernel."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _recv_line(sock, deadline, limit=4096):
    data = b""
    while not data.endswith(b"\n"):
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(limit - len(data))
        if not chunk:
            raise EOFError("closed during the shared-memory set-up")
        data += chunk
        if len(data) >= limit:
            raise ProtocolError("shared-memory set-up message too long")
    return json.loads(data)


class _Segment:
    def __init__(self, number, fd, size, memory):
        self.number = number
        self.fd = fd
        self.size = size
        self.memory = memory                       # an mmap.mmap
        self.address = np.frombuffer(memory, np.uint8, 1).ctypes.data


class SharedArena:
    """Memory files the listener's owner allocates buffers from, so that
    connections can hand co-located peers a buffer's place instead of its
    bytes.  Buffers live as long as the process; segments only grow.  Each
    memory file is at least as large as all earlier ones together, so n bytes
    of buffers take O(log n) files (two descriptors each, ours and the
    mapping's) and at most about 2n of address space; the kernel commits a
    page only when it is first touched."""

    def __init__(self):
        self._segments = []
        self._used = 0                # bytes taken from the newest segment
        self._allocated = {}          # id(array) -> (array, segment, offset): find() without address maths
        self._lock = threading.Lock()
        self._closed = False

    def allocate(self, nbytes):
        """A writable uint8 array of nbytes in shared memory, after a sum control block."""
        span = -(-(SUM_CONTROL_BYTES + nbytes) // ARENA_ALIGN) * ARENA_ALIGN
        with self._lock:
            if not self._segments or self._used + span > self._segments[-1].size:
                reserved = sum(segment.size for segment in self._segments)
                self._segments.append(self._new_segment(len(self._segments),
                                                        max(ARENA_SEGMENT_BYTES, span, reserved)))
                self._used = 0
            segment, offset = self._segments[-1], self._used + SUM_CONTROL_BYTES
            self._used += span
            array = np.frombuffer(segment.memory, np.uint8, nbytes, offset)
            self._allocated[id(array)] = (array, segment, offset)
        return array

    @staticmethod
    def _new_segment(number, size):
        fd = os.memfd_create("rdmakv-shm-results", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            memory = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        return _Segment(number, fd, size, memory)

    def locate(self, payload):
        """(segment, offset) of a payload that lies wholly in the arena and is
        worth sharing, else None."""
        if self._closed:
            return None
        return self.find(payload)

    def find(self, payload):
        """(segment, offset) of an arena buffer, shared or not any more; else None."""
        if type(payload) is not np.ndarray or payload.nbytes < SHARED_MIN_BYTES or not payload.flags.c_contiguous:
            return None
        known = self._allocated.get(id(payload))
        if known is not None and known[0] is payload:
            return known[1], known[2]
        start = payload.ctypes.data
        for segment in self._segments:
            offset = start - segment.address
            if 0 <= offset and offset + payload.nbytes <= segment.size:
                return segment, offset
        return None

    def pass_segment(self, sock, segment):
        """Send a segment's fd and size over a Unix socket (under the lock, so
        close() cannot free the fd number meanwhile)."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the shared arena is closed")
            if socket.send_fds(sock, [SEGMENT.pack(segment.number, segment.size)], [segment.fd]) != SEGMENT.size:
                raise OSError(errno.EAGAIN, "the segment announcement did not fit the socket")

    def close(self):
        """Stop sharing: later payloads go through the rings; mappings stay while buffers do."""
        with self._lock:
            self._closed = True
            for segment in self._segments:
                if segment.fd >= 0:
                    os.close(segment.fd)
                    segment.fd = -1


def _flagged(header, bit):
    """header (bytes) with a private flag bit set."""
    header = bytearray(header)
    _FLAGS.pack_into(header, protocol.FLAGS_OFFSET, _FLAGS.unpack_from(header, protocol.FLAGS_OFFSET)[0] | bit)
    return header


class ShmConnection(Connection):
    def __init__(self, sock, channel, peer, timeout, arena=None, source="?"):
        self._sock = sock
        self._channel = channel
        self.peer = peer
        self.source = source
        self._timeout = timeout
        self._arena = arena
        self._shared_with_peer = set()    # numbers of our segments the peer has
        self._peer_segments = {}          # number -> mmap of the peer's segment
        self._place_follows = False       # the header just read announced a PLACE, not bytes
        self._sums = {}                   # (key, chunk) -> (place of even rounds, of odd rounds, nbytes)
        self.summed_bytes = 0             # push bytes this side added straight into the peer's sums
        self._offered_sums = {}           # (key, chunk) -> nbytes: our sums the peer adds into
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._header = bytearray(protocol.HEADER_SIZE)
        self._closed = False
        self._pid = os.getpid()

    def _io(self, what, call, *args):
        if self._closed:
            raise ConnectionClosed(f"{what} {self.peer}: connection already closed")
        try:
            return call(*args)
        except TimeoutError:
            raise PeerTimeout(f"{what} {self.peer}: no progress for {self._timeout:g} s (RDMAKV_TIMEOUT)") from None
        except EOFError:
            raise EndOfStream(f"{self.peer} closed the connection") from None
        except ConnectionAbortedError:
            raise ConnectionClosed(f"{what} {self.peer}: connection closed") from None
        except ConnectionResetError:
            raise ConnectionClosed(f"{what} {self.peer}: the peer left mid-message") from None
        except ValueError as exc:
            raise ProtocolError(f"{what} {self.peer}: {exc}") from None
        except OSError as exc:
            raise TransportError(f"{what} {self.peer}: {exc}") from None

    @property
    def sums_remotely(self):
        return self._arena is not None

    def send(self, header, payload=None):
        with self._send_lock:
            if self._sums and payload is not None and self._sum_in_place(header, payload):
                header, payload = _flagged(header, SUMMED), None
            place = self._arena.locate(payload) if self._arena is not None and payload is not None else None
            if place is not None:
                segment, offset = place
                self._share(segment)
                header = _flagged(header, SHARED_PAYLOAD)
                payload = PLACE.pack(segment.number, offset)
            self._io("send to", self._channel.send_frame, header, payload, self._timeout)

    def _sum_in_place(self, header, payload):
        """Add a push the peer offered a sum for straight into it; False for any other message."""
        _, _, op, dtype, flags, key, chunk, _, rnd, length, _ = protocol.HEADER.unpack_from(header)
        offer = self._sums.get((key, chunk))
        if offer is None or op != Op.PUSH or flags & ~protocol.FLAG_ACK or length != offer[2]:
            return False
        memory, offset = offer[rnd % 2]
        self._io("add to the shared sum of", _t.sum_into_shared, memory, offset, payload, dtype, rnd,
                 self._timeout, self._channel)
        self.summed_bytes += length
        return True

    def offer_sum(self, key, chunk, buffers):
        places = [self._arena.find(buffer) if self._arena is not None else None for buffer in buffers]
        if len(places) != 2 or None in places:
            raise ValueError("offer_sum takes the two round buffers from the listener's shared_buffer")
        with self._send_lock:
            for segment, _ in places:
                self._share(segment)
            self._offered_sums[(key, chunk)] = buffers[0].nbytes
            (even, even_offset), (odd, odd_offset) = places
            offer = SUM_PLACES.pack(even.number, even_offset, odd.number, odd_offset, buffers[0].nbytes)
            header = _flagged(protocol.pack(Op.PUSH, key=key, chunk=chunk, length=SUM_PLACES.size), SUM_OFFER)
            self._io("send to", self._channel.send_frame, header, offer, self._timeout)

    def shares(self, payload):
        return self._arena is not None and self._arena.locate(payload) is not None

    def _share(self, segment):
        """Pass a segment's fd to the peer, ahead of the first frame that names it
        (the caller holds the send lock)."""
        if segment.number not in self._shared_with_peer:
            self._io("send to", self._arena.pass_segment, self._sock, segment)
            self._shared_with_peer.add(segment.number)

    def recv_header(self, idle_timeout):
        with self._recv_lock:
            while True:
                if not self._io("receive from", self._channel.wait_readable, idle_timeout):
                    return None
                self._io("receive from", self._channel.recv_into, self._header, self._timeout)
                flags = _FLAGS.unpack_from(self._header, protocol.FLAGS_OFFSET)[0]
                private = flags & PRIVATE_FLAGS
                if private:
                    _FLAGS.pack_into(self._header, protocol.FLAGS_OFFSET, flags & ~PRIVATE_FLAGS)
                header = protocol.unpack(self._header)
                if private == SUM_OFFER:
                    self._take_sum_offer(header)
                    continue
                self._place_follows = private == SHARED_PAYLOAD
                if self._place_follows and header.length == 0:
                    raise ProtocolError(f"receive from {self.peer}: a shared payload of 0 bytes")
                if private == SUMMED:
                    return self._summed(header)
                if private and not self._place_follows:
                    raise ProtocolError(f"receive from {self.peer}: private flags 0x{private:x} together")
                return header

    def readable_bytes(self):
        # Arrivals in the ring wake no descriptor: fileno() stays -1.
        if not self._io("receive from", self._channel.wait_readable, 0):
            return 0
        return self._io("receive from", self._channel.available)

    def _take_sum_offer(self, header):
        """Record a sum the peer lets us add our pushes into (the caller holds the receive lock)."""
        if self._arena is not None or header.op != Op.PUSH or header.length != SUM_PLACES.size:
            raise ProtocolError(f"receive from {self.peer}: a malformed shared-sum offer")
        raw = bytearray(SUM_PLACES.size)
        self._io("receive from", self._channel.recv_into, raw, self._timeout)
        even, even_offset, odd, odd_offset, nbytes = SUM_PLACES.unpack(raw)
        places = []
        for number, offset in ((even, even_offset), (odd, odd_offset)):
            memory = self._peer_segment(number)
            if (not nbytes or offset < SUM_CONTROL_BYTES or offset % SUM_CONTROL_BYTES
                    or offset + nbytes > len(memory)):
                raise ProtocolError(f"receive from {self.peer}: a shared sum of {nbytes} bytes at offset "
                                    f"{offset} does not fit segment {number}")
            places.append((memory, offset))
        self._sums[(header.key, header.chunk)] = (places[0], places[1], nbytes)

    def _summed(self, header):
        """A push the peer added into a sum we offered: checked, and flagged for the layer above."""
        nbytes = self._offered_sums.get((header.key, header.chunk))
        if nbytes is None or header.op != Op.PUSH or header.flags & ~protocol.FLAG_ACK or header.length != nbytes:
            raise ProtocolError(f"receive from {self.peer}: a push of key {header.key} chunk {header.chunk} "
                                f"summed in place without an offer for it")
        return header._replace(flags=header.flags | protocol.FLAG_SUMMED_IN_PLACE)

    def recv_payload(self, header, destination):
        with self._recv_lock:
            try:
                if self._place_follows:
                    self._place_follows = False
                    place = bytearray(PLACE.size)
                    self._io("receive from", self._channel.recv_into, place, self._timeout)
                    number, offset = PLACE.unpack(place)
                    memory = self._peer_segment(number)
                    self._io("receive from", _t.copy_region, memory, offset, destination)
                else:
                    self._io("receive from", self._channel.recv_into, destination, self._timeout)
            except EndOfStream:
                raise ConnectionClosed(f"receive from {self.peer}: the peer left mid-message") from None

    def _peer_segment(self, number):
        """The peer's segment `number`, mapped (writable: shared sums are added into
        it); its fd was sent ahead of the frame, so it waits on the socket (or
        the peer is broken)."""
        deadline = time.monotonic() + self._timeout
        while number not in self._peer_segments:
            if len(self._peer_segments) >= MAX_SHARED_SEGMENTS:
                raise ProtocolError(f"receive from {self.peer}: more than {MAX_SHARED_SEGMENTS} shared segments")
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                raise ProtocolError(f"receive from {self.peer}: shared segment {number} was never sent")
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, SEGMENT.size, 1)
            except OSError as exc:
                raise TransportError(f"receive from {self.peer}: shared segment: {exc}") from None
            try:
                if not data:
                    raise EndOfStream(f"{self.peer} closed the connection")
                if len(data) != SEGMENT.size or len(fds) != 1:
                    raise ProtocolError(f"receive from {self.peer}: a malformed shared-segment announcement")
                got, size = SEGMENT.unpack(data)
                if got in self._peer_segments:
                    raise ProtocolError(f"receive from {self.peer}: shared segment {got} sent twice")
                if os.fstat(fds[0]).st_size != size or not size:
                    raise ProtocolError(f"receive from {self.peer}: shared segment {got} is not {size} bytes")
                if not fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
                    raise ProtocolError(f"receive from {self.peer}: shared segment {got} is not sealed "
                                        f"against shrinking")
                self._peer_segments[got] = mmap.mmap(fds[0], size, mmap.MAP_SHARED,
                                                     mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError) as exc:
                raise ProtocolError(f"receive from {self.peer}: shared segment: {exc}") from None
            finally:
                for fd in fds:
                    os.close(fd)
        return self._peer_segments[number]

    def close(self):
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return              # a forked child must not end its parent's connection
        self._channel.shutdown()             # the peer sees the end; our blocked threads wake
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # The mapping and the fd must outlive every thread still inside a call.
        with self._send_lock, self._recv_lock:
            self._channel.unmap()
            for memory in self._peer_segments.values():
                memory.close()
            self._peer_segments.clear()
            self._sock.close()


class _SetUp:
    """A co-located connector's set-up in progress: its socket, who it is, and until when it may take."""

    def __init__(self, sock, pid, uid, deadline):
        self.sock = sock
        self.uid = uid
        self.name = f"local pid {pid} (shm)"
        self.deadline = deadline


class ShmListener(Listener):
    """The transport underneath's listener, plus the abstract Unix socket
    co-located connectors find it by."""

    def __init__(self, inner, forced, host, port, timeout):
        self._inner = inner.Listener(host, port, timeout)
        self.address = self._inner.address
        self._timeout = timeout
        self._forced = forced
        self._ring_bytes = ring_bytes()
        self._allowed_uids = allowed_uids()
        self._arena = SharedArena()
        self._setups = []             # _SetUps in progress, oldest first
        self._refusals = Throttle()
        self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            name = _endpoint(*self.address)
            if name is None:
                raise OSError(f"{self.address[0]!r} does not resolve")
            self._unix.bind(name)
            self._unix.listen(128)
        except OSError as exc:
            self._unix.close()
            self._unix = None
            if forced:
                self._inner.close()
                raise TransportError(f"cannot offer shared memory at {netif.format_address(*self.address)}: {exc}")
            log.warning("shared memory not offered at %s: %s", netif.format_address(*self.address), exc)
        else:
            self._unix.setblocking(False)

    def watch(self):
        fds, wake = self._inner.watch()
        if self._unix is None:
            return fds, wake
        fds = fds + [self._unix.fileno()] + [setup.sock.fileno() for setup in self._setups]
        if self._setups:
            wake = min(self._setups[0].deadline, wake or math.inf)
        return fds, wake

    def accept(self, timeout):
        return self.wait_ready(timeout, self._accept_ready)

    def _accept_ready(self):
        """A connection that is ready now, or None; never waits.  New co-located
        connectors join the set-ups in progress, which advance as their bytes come."""
        if self._unix is not None:
            for _ in range(MAX_SETUPS):            # then give the others a turn
                try:
                    sock, _ = self._unix.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    break
                self._admit(sock)
            connection = self.advance_setups(
                self._setups, lambda setup: self._refuse(setup.sock, setup.name,
                                                         f"no set-up within {SETUP_SECONDS:g} s"), self._advance)
            if connection is not None:
                return connection
        return self._inner.accept(0)

    def _admit(self, sock):
        """Start the set-up of a new co-located connector, or refuse it at once."""
        try:
            sock.setblocking(False)
            pid, uid = _peer_credentials(sock)
        except OSError as exc:
            self._refuse(sock, "a local process (shm)", f"no credentials: {exc}")
            return
        name = f"local pid {pid} uid {uid} (shm)"
        if uid not in self._allowed_uids:
            self._refuse(sock, name, f"uid {uid} may not share memory with this process (uid {os.getuid()}); "
                                     f"RDMAKV_SHM_ALLOW_UIDS lists the uids that may")
        elif len(self._setups) >= MAX_SETUPS:
            self._refuse(sock, name, f"{MAX_SETUPS} shared-memory set-ups are already in progress")
        elif sum(setup.uid == uid for setup in self._setups) >= MAX_SETUPS_PER_UID:
            self._refuse(sock, name, f"{MAX_SETUPS_PER_UID} shared-memory set-ups of uid {uid} are already "
                                     f"in progress")
        else:
            self._setups.append(_SetUp(sock, pid, uid, time.monotonic() + min(SETUP_SECONDS, self._timeout)))

    def _refuse(self, sock, name, reason):
        self._refusals.warn(log, "shared-memory connections refused",
                            "refused a shared-memory connection from %s: %s", name, reason)
        try:
            sock.send(json.dumps({"ok": False, "error": reason}).encode() + b"\n", socket.MSG_DONTWAIT)
        except OSError:
            pass
        sock.close()

    def _advance(self, setup):
        """The acceptor's side of one set-up: a ShmConnection once its message is
        in, False while it is not, None (after refusing it) if it fails."""
        memfd = -1
        try:
            try:
                data, fds, flags, _ = socket.recv_fds(setup.sock, 4096, 1, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            if fds:
                memfd = fds[0]
            for extra in fds[1:]:
                os.close(extra)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("its memory fd could not be received (out of descriptors?)")
            hello = json.loads(data) if data else None
            if not isinstance(hello, dict) or hello.get("rdmakv_shm") != SETUP_VERSION or memfd < 0:
                raise ProtocolError("not an rdmakv shared-memory set-up")
            size = hello.get("ring_bytes")
            if (not isinstance(size, int) or not MIN_RING_BYTES <= size <= MAX_RING_BYTES or size & (size - 1)):
                raise ProtocolError(f"ring size {size!r} is not a power of two in range")
            if os.fstat(memfd).st_size != _t.shm_segment_bytes(size):
                raise ProtocolError("the segment's size does not match its ring size")
            seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
            if not seals & fcntl.F_SEAL_SHRINK:
                raise ProtocolError("the segment is not sealed against shrinking")
            channel = _t.ShmChannel(memfd, setup.sock.fileno(), size, False)
            os.close(memfd)
            memfd = -1
            setup.sock.send(b'{"ok": true}\n', socket.MSG_DONTWAIT)     # an empty socket takes a line
            return ShmConnection(setup.sock, channel, setup.name, self._timeout, self._arena,
                                 source=f"local uid {setup.uid}")
        except (OSError, ValueError, ProtocolError) as exc:
            self._refuse(setup.sock, setup.name, str(exc))
            return None
        finally:
            if memfd >= 0:
                os.close(memfd)

    def shared_buffer(self, nbytes):
        """A writable uint8 array whose bytes co-located peers read in place
        when it is sent to them (see SharedArena); a plain one where that
        cannot help."""
        if self._unix is None or nbytes < SHARED_MIN_BYTES:
            return np.empty(nbytes, np.uint8)
        return self._arena.allocate(nbytes)

    def shares_sums(self, buffer):
        """Whether buffer came from shared_buffer in shared memory, so co-located
        workers may add into it (offer_sum) and sum_into must be used for it."""
        return self._arena.find(buffer) is not None

    def sum_into(self, buffer, source, dtype_code, round):
        """Contribute source to round's sum in a shared buffer under its lock (see
        "Shared sums"); TimeoutError when a co-located worker holds it too long."""
        segment, offset = self._arena.find(buffer)
        _t.sum_into_shared(segment.memory, offset, source, dtype_code, round, self._timeout)

    def close(self):
        if self._unix is not None:
            self._unix.close()
        for setup in self._setups:
            setup.sock.close()
        self._setups = []
        self._arena.close()
        self._inner.close()


def _connect_shm(host, port, timeout, forced):
    """A ShmConnection to the listener at (host, port) if it is co-located and
    offers shared memory, else None."""
    name = _endpoint(host, port)
    if name is None:
        return None
    where = netif.format_address(host, port)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(name)
    except OSError:
        sock.close()             # nothing co-located listens there
        return None
    memfd = -1
    try:
        # Anyone on this host may bind an abstract name first.  A squatter of
        # another user is never handed our memory; one of ours (or anyone,
        # without a cluster secret) still meets the authentication on top.
        _, uid = _peer_credentials(sock)
        if uid not in allowed_uids():
            raise TransportError(f"the process at its shared-memory socket runs as uid {uid}, not {os.getuid()} "
                                 f"(RDMAKV_SHM_ALLOW_UIDS lists the other uids that may)")
        size = ring_bytes()
        memfd = os.memfd_create("rdmakv-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, _t.shm_segment_bytes(size))
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        channel = _t.ShmChannel(memfd, sock.fileno(), size, True)
        deadline = time.monotonic() + min(ANSWER_SECONDS, timeout)
        sock.settimeout(ANSWER_SECONDS)
        hello = {"rdmakv_shm": SETUP_VERSION, "ring_bytes": size, "pid": os.getpid()}
        socket.send_fds(sock, [json.dumps(hello).encode()], [memfd])
        os.close(memfd)
        memfd = -1
        reply = _recv_line(sock, deadline)
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            channel.unmap()
            raise TransportError(f"{where} refused shared memory: "
                                 f"{reply.get('error') if isinstance(reply, dict) else reply!r}")
        sock.setblocking(False)
        return ShmConnection(sock, channel, f"{where} (shm)", timeout)
    except (OSError, EOFError, ValueError, TransportError, ProtocolError) as exc:
        sock.close()
        if forced:
            raise TransportError(f"shared memory with {where} failed: {exc}") from None
        log.warning("shared memory with %s failed, using the transport underneath: %s", where, exc)
        return None
    finally:
        if memfd >= 0:
            os.close(memfd)


class Layer:
    """Shared memory over `inner` (a transport module): exports Listener and
    connect like every transport module."""

    def __init__(self, inner, forced=False):
        self.inner = inner
        self.forced = forced
        self.__name__ = f"rdmakv.transport.shm over {inner.__name__}"

    def Listener(self, host, port, timeout):   # noqa: N802 - the name every transport exports
        return ShmListener(self.inner, self.forced, host, port, timeout)

    def connect(self, host, port, timeout, retry_until=None):
        connection = _connect_shm(host, port, timeout, self.forced)
        if connection is not None:
            return connection
        return self.inner.connect(host, port, timeout, retry_until=retry_until)


def over(inner, forced=False):
    return Layer(inner, forced)
