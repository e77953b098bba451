"""The transport contract every transport implements, and the reader thread
that drives a connection.  Nothing above this module knows which transport a
connection uses.

A message is a 48-byte header (rdmakv.core.protocol) plus `length` payload bytes.
The sender hands over the header and a buffer; the receiver learns the header
first and then names the buffer the payload must land in, so payloads go from
the sender's array to the receiver's array with no intermediate copy.

Transports move tagged buffers and know nothing of keys, rounds or sums.  A
message's tag (protocol.Tag, computed from its header by protocol.tag_of) is
a stream and a sequence number; a transport only compares tags.  What a
connection or listener can do beyond moving messages is one description,
`features` (Features): placing (offer a receive buffer for a tag, which the
peer then writes straight into: verbs) and sharing (expose buffers under a
stream, which the peer maps and writes into itself: shared memory)."""
import abc
import errno
import logging
import math
import select
import threading
import time
from collections import namedtuple

import numpy as np

from rdmakv.core import protocol
from rdmakv.core.errors import EndOfStream, PeerTimeout, ProtocolError, RdmaKVError
from rdmakv.core.protocol import Op

log = logging.getLogger("rdmakv.transport")


class Throttle:
    """Lets at most `burst` messages through per `period` seconds, then reports how
    many it held back, so a flood of hostile connections cannot flood the log."""

    def __init__(self, burst=20, period=10.0):
        self.burst, self.period = burst, period
        self._start, self._count, self._held = 0.0, 0, 0
        self._lock = threading.Lock()

    def allow(self):
        """(whether to log this one, how many were held back before it)."""
        now = time.monotonic()
        with self._lock:
            if now - self._start > self.period:
                held, self._start, self._count, self._held = self._held, now, 0, 0
            else:
                held = 0
            self._count += 1
            if self._count > self.burst:
                self._held += 1
                return False, held
            return True, held

    def warn(self, logger, kind, message, *args):
        """logger.warning(message, *args) within the budget; first, how many of `kind` were held back."""
        allowed, held = self.allow()
        if held:
            logger.warning("%d more %s (not shown)", held, kind)
        if allowed:
            logger.warning(message, *args)


closed_connection_warnings = Throttle()
_HEARTBEAT = protocol.pack(Op.HEARTBEAT)

IDLE_POLL_SECONDS = 1.0
HEARTBEATS_PER_TIMEOUT = 4     # a live peer is heard from this many times per silence limit


Features = namedtuple("Features", "places shares plain_frames", defaults=(False, False, False))
Features.__doc__ = """What a connection or listener offers beyond moving messages.
places: offer(tag, buffer) lets the peer write the message of that tag
  straight into our buffer (verbs);
shares: expose(stream, buffers) lets the peer map our buffers and write into
  them itself, peer_regions(stream) gives the buffers the peer exposed to us,
  and a listener's allocate() gives buffers that can be exposed (shared memory);
plain_frames: the link carries a header and its payload only, so a native
  engine may run it (engine_stream())."""

# A buffer in memory both processes map: the number its memory file has between
# the two, the buffer's offset in it, the mapping (writable), the buffer's size,
# and what ends a wait on it when the connection closes locally (or None).
Region = namedtuple("Region", "number offset memory nbytes stop")


class Connection(abc.ABC):
    peer = "?"           # printable address of the other side
    source = "?"         # who is at the other side, for per-source limits: an address, or a local uid
    features = Features()

    @abc.abstractmethod
    def send(self, header, payload=None, in_place=False):
        """Send header bytes and an optional contiguous buffer; return once the buffer may be reused.
        Thread-safe: concurrent senders are serialized.  in_place (features.shares
        only): the header's `length` payload bytes were already written into the
        region the peer exposed for the message's tag stream; only the header goes,
        and arrives flagged protocol.FLAG_IN_PLACE."""

    @abc.abstractmethod
    def recv_header(self, idle_timeout):
        """The next protocol.Header, or None if nothing arrived within idle_timeout seconds."""

    @abc.abstractmethod
    def recv_payload(self, header, destination):
        """Place the payload of `header` into the writable buffer `destination` (header.length bytes)."""

    @abc.abstractmethod
    def close(self):
        """Release everything; idempotent; wakes a blocked receiver."""

    def readable_bytes(self):
        """How many bytes recv_header/recv_payload can take now without waiting;
        EndOfStream once the peer left and nothing is left; None where the
        transport cannot tell (a handshake then runs in a thread of its own)."""
        return None

    def fileno(self):
        """A descriptor that polls readable when bytes arrive, or -1 when arrivals
        wake no descriptor (readable_bytes must then be asked again later)."""
        return -1

    def offer(self, tag, buffer):
        """Advice: the payload of the peer's next message of tag.stream, numbered
        tag.sequence, will be received into `buffer`.  Where features.places, the
        buffer goes to the peer, which then writes that payload straight into it;
        elsewhere the call does nothing.  The caller must leave `buffer` alone
        until that message is received or a later offer for the same stream
        replaces this one."""

    def expose(self, stream, buffers):
        """Let the peer write into `buffers` (two, from the listener's allocate())
        the payloads of its messages of tag `stream`: it finds them with
        peer_regions(stream), writes, and sends such a message with in_place.
        Only where features.shares; the buffers must stay for as long as the
        connection."""
        raise NotImplementedError(f"{type(self).__name__} cannot share buffers")

    def peer_regions(self, stream):
        """The Regions the peer exposed to us under `stream`, or None."""
        return None


class Listener(abc.ABC):
    address = None       # (host, port) peers connect to

    @abc.abstractmethod
    def accept(self, timeout):
        """A new Connection, or None after timeout seconds.  accept(0) never waits:
        a connection whose set-up is not complete yet stays with the listener.
        OSError when accepting fails (EMFILE: out of descriptors)."""

    @abc.abstractmethod
    def watch(self):
        """(descriptors that poll readable when accept(0) may return a connection,
        a time.monotonic() by which accept(0) must be called again, or None)."""

    @abc.abstractmethod
    def close(self):
        """Stop listening; idempotent."""

    features = Features()

    def allocate(self, nbytes):
        """A writable uint8 array of nbytes; where features.shares, one that
        connections can expose to co-located peers and send as its place
        (region() then gives it)."""
        return np.empty(nbytes, np.uint8)

    def region(self, buffer):
        """The Region of a buffer from allocate() in memory peers can map, else None."""
        return None

    def wait_ready(self, timeout, take):
        """accept() for a listener that advances set-ups without waiting on any:
        take() (a connection or None, never waits) until it gives one or timeout
        seconds pass, sleeping on watch() in between."""
        deadline = time.monotonic() + timeout
        while True:
            connection = take()
            left = deadline - time.monotonic()
            if connection is not None or left <= 0:
                return connection
            fds, wake = self.watch()
            if wake is not None:
                left = min(left, max(0.0, wake - time.monotonic()))
            poller = select.poll()
            for fd in fds:
                if fd < 0:
                    raise OSError(errno.EBADF, "listener closed")
                poller.register(fd, select.POLLIN)
            poller.poll(max(0, math.ceil(left * 1000)))

    @staticmethod
    def advance_setups(setups, expire, advance):
        """One pass over set-ups in progress (oldest first, each with a deadline):
        expire(setup) those past it, advance(setup) the others (a connection, False
        while unfinished, None once refused); returns the first finished connection."""
        now = time.monotonic()
        while setups and setups[0].deadline <= now:
            expire(setups.pop(0))
        for setup in list(setups):
            connection = advance(setup)
            if connection is not False:
                setups.remove(setup)
                if connection is not None:
                    return connection
        return None


class Handler:
    """What a Peer's reader thread calls; subclasses override what they need."""

    def destination(self, peer, header):
        """A writable buffer of header.length bytes for the payload, or None for a control payload."""
        return None

    def on_message(self, peer, header, payload):
        raise NotImplementedError

    def on_closed(self, peer, error):
        """The connection ended: error is None after a local close, else why."""

    introduction = "first message"     # what an accepted peer must send before anything else

    def introduced(self, peer):
        """Whether an accepted peer has introduced itself (see Peer's introduce_by)."""
        return True


class Peer:
    """A connection and the thread that reads from it.

    The reader validates lengths before receiving, so a hostile header can
    never make us allocate an unchecked amount of memory.

    Liveness, for control links (silence_limit set): once the handshake is
    done, the reader sends a HEARTBEAT every `silence_limit /
    HEARTBEATS_PER_TIMEOUT` seconds and fails the connection with PeerTimeout
    when nothing at all arrived for `silence_limit` seconds.  TCP keepalive
    cannot see a peer that is stopped (SIGSTOP) or hung: its kernel still
    acknowledges every probe.  Only links that carry small messages may have
    it: the reader thread sends the heartbeat, and on a link where both sides
    send large payloads it could wait behind a send that waits for this very
    reader."""

    def __init__(self, connection, handler, name, handshake=None, introduce_within=None, silence_limit=None):
        self.connection = connection
        self.handshake = handshake  # run first, in the reader thread; it raises to refuse the peer
        # An accepted peer that has not introduced itself (handler.introduced) this many
        # seconds after authenticating is closed: it would hold a thread for nothing.
        self._introduce_within = introduce_within
        self.handler = handler
        self.name = name
        self.silence_limit = silence_limit
        self.info = {}          # what the upper layer learned about this peer
        self._closing = False
        self._handed_off = False
        self._thread = threading.Thread(target=self._read_loop, name=f"rdmakv-read-{name}", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def send(self, op, payload=None, in_place=False, **fields):
        """Send a message; in_place: its payload is already in the peer's region (Connection.send)."""
        length = 0 if payload is None else memoryview(payload).nbytes
        self.connection.send(protocol.pack(op, length=length, **fields), None if in_place else payload, in_place)

    def offer(self, tag, buffer):
        self.connection.offer(tag, buffer)

    def send_json(self, op, obj, **fields):
        self.send(op, protocol.encode_json(obj), **fields)

    def _read_loop(self):
        error = None
        try:
            if self.handshake is not None:
                self.handshake(self.connection)
            introduce_by = None if self._introduce_within is None else time.monotonic() + self._introduce_within
            limit = self.silence_limit
            interval = None if limit is None else limit / HEARTBEATS_PER_TIMEOUT
            poll = IDLE_POLL_SECONDS if limit is None else min(IDLE_POLL_SECONDS, interval)
            heard = beat = time.monotonic()
            while not self._closing:
                if introduce_by is not None:
                    if self.handler.introduced(self):
                        introduce_by = None
                    elif time.monotonic() > introduce_by:
                        raise PeerTimeout(f"{self.name} sent no {self.handler.introduction} within "
                                          f"{self._introduce_within:g} s of authenticating (RDMAKV_TIMEOUT)")
                header = self.connection.recv_header(poll)
                if limit is not None:
                    now = time.monotonic()
                    if now - beat >= interval:
                        beat = now
                        self.connection.send(_HEARTBEAT)
                    if header is not None:
                        heard = now
                    elif now - heard > limit:
                        raise PeerTimeout(f"{self.name} sent nothing for {now - heard:.1f} s (RDMAKV_TIMEOUT "
                                          f"{limit:g} s): it is stopped, hung or cut off")
                if header is not None:
                    self.receive(header)
                if self._handed_off:
                    return
        except RdmaKVError as exc:
            error = exc
        except Exception as exc:  # a bug in a handler must not kill the process silently
            log.exception("reader for %s failed", self.name)
            error = exc
        finally:
            if not self._handed_off:
                self.ended(error)

    def receive(self, header, arrived=None):
        """Take in the rest of a message whose header was read: its payload, into
        the handler's destination (checked against the header first), then
        handler.on_message.  Raises what makes the connection unusable.
        arrived: the payload, when a native engine has read it already."""
        if header.op == Op.HEARTBEAT:
            if header.length:
                raise ProtocolError(f"HEARTBEAT with a payload of {header.length} bytes")
            return
        payload = None
        if header.length and not header.flags & protocol.FLAG_IN_PLACE:
            payload = self.handler.destination(self, header)
            if payload is None:
                if header.length > protocol.MAX_CONTROL_BYTES:
                    raise ProtocolError(
                        f"{protocol.op_name(header.op)} payload of {header.length} bytes "
                        f"exceeds the {protocol.MAX_CONTROL_BYTES}-byte control limit")
                payload = bytearray(header.length)
            elif memoryview(payload).nbytes != header.length:
                raise ProtocolError(
                    f"{protocol.op_name(header.op)} for key {header.key} chunk {header.chunk} "
                    f"carries {header.length} bytes, expected {memoryview(payload).nbytes}")
            if arrived is None:
                self.connection.recv_payload(header, payload)
            else:
                memoryview(payload).cast("B")[:] = arrived
        self.handler.on_message(self, header, payload)

    def hand_off(self):
        """From the message being handled on, a native engine reads this
        connection: the reader thread returns without closing it."""
        self._handed_off = True

    def ended(self, error):
        """The connection is over: end it and tell the handler (error None after a
        local close).  A handed-off connection is only shut: the engine's threads
        may still hold its descriptor, which is closed after them."""
        try:
            if self._closing:
                error = None
            elif isinstance(error, EndOfStream):
                log.debug("%s closed the connection", self.name)
            elif error is not None:
                closed_connection_warnings.warn(log, "connections closed with errors",
                                                "connection to %s (%s) closed: %s", self.name, self.connection.peer,
                                                error)
            self._release()
        finally:
            self.handler.on_closed(self, error)

    def _release(self):
        if self._handed_off:
            self.connection.shut()
        else:
            self.connection.close()

    def close(self, timeout=5.0):
        self._closing = True
        self._release()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
