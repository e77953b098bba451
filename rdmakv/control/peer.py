"""A connection and the thread that reads it: messages dispatched to a
Handler (the scheduler, a server, a worker's links on the Python data path),
payloads landing where the handler says, heartbeats on control links.  This is
where messages mean something (ops, keys, chunks); the transports underneath
(rdmakv/transport/) only move tagged buffers."""
import logging
import threading
import time

from rdmakv.core import protocol
from rdmakv.core.errors import EndOfStream, PeerTimeout, ProtocolError, RdmaKVError
from rdmakv.core.protocol import Op
from rdmakv.transport.base import Throttle

log = logging.getLogger("rdmakv.transport")

closed_connection_warnings = Throttle()
_HEARTBEAT = protocol.pack(Op.HEARTBEAT)

IDLE_POLL_SECONDS = 1.0
HEARTBEATS_PER_TIMEOUT = 4     # a live peer is heard from this many times per silence limit


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
