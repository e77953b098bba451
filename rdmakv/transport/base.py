"""The transport contract every transport implements.  Nothing above the
transports knows which one a connection uses (the thread that reads a
connection and dispatches its messages is rdmakv/control/peer.py).

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
import math
import select
import threading
import time
from collections import namedtuple

import numpy as np

from rdmakv.core.errors import ConnectionClosed, EndOfStream, PeerTimeout, ProtocolError, TransportError


def worded(peer, timeout, what, call, *args):
    """call(*args), a loop of the compiled module, with its exceptions worded as
    errors of the connection to `peer` ("send to", "receive from": `what`)."""
    try:
        return call(*args)
    except TimeoutError:
        raise PeerTimeout(f"{what} {peer}: no progress for {timeout:g} s (RDMAKV_TIMEOUT)") from None
    except EOFError:
        raise EndOfStream(f"{peer} closed the connection") from None
    except ConnectionAbortedError:
        raise ConnectionClosed(f"{what} {peer}: connection closed") from None
    except ConnectionResetError:
        raise ConnectionClosed(f"{what} {peer}: the peer left mid-message") from None
    except ValueError as exc:
        raise ProtocolError(f"{what} {peer}: {exc}") from None
    except OSError as exc:
        raise TransportError(f"{what} {peer}: {exc}") from None


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
    # Verbs streams: an MRCache on the connection's PD, in which a native engine
    # registers the buffers the peer's NIC reads from or writes into (zero copy).
    registrations = None
    # Bytes of frames this connection sent and received whole (headers, payloads, MACs,
    # a shared payload's place), counted under its send and receive locks.  A native
    # engine that runs the link counts its own (Engine.wire_bytes, ServerEngine.wire_bytes).
    sent_bytes = 0
    received_bytes = 0

    def wire_bytes(self):
        """(bytes sent, bytes received) through this object so far."""
        return self.sent_bytes, self.received_bytes

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
