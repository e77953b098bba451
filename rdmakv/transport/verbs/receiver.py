"""What arrives on one verbs connection, in order: the progress thread queues
each message (its receive slot, or the offer the peer wrote it into);
recv_header takes the next and checks it by its protocol, recv_payload lands
its payload by that protocol, and each message's receive slot goes back to the
device and its credit back to the peer as it is consumed."""
import threading
import time
from collections import deque

from rdmakv.core import protocol
from rdmakv.core.errors import ConnectionClosed, ProtocolError, VerbsError
from rdmakv.transport.verbs.frames import K_EAGER, K_PLACED, K_RNDV, PREFIX


class Receiver:
    def __init__(self, state, resources, flow, sender, eager, rendezvous, offers):
        self._state = state
        self._resources = resources
        self._flow = flow
        self._sender = sender
        self._eager = eager
        self._rendezvous = rendezvous
        self._offers = offers
        self._lock = threading.Lock()   # one receiver at a time, from header to payload
        self._inbox = deque()          # (kind, slot or offer id, byte_len) of messages not yet taken
        self._current = None           # (slot, kind, id) of the message whose header recv_header returned
        self._current_here = 0         # bytes of that message's payload already here

    # ---- the progress thread tells (cv held) ---------------------------------------------
    def arrived(self, kind, index, byte_len):
        """A message came: an eager or rendezvous frame in receive slot `index`
        (byte_len bytes), or a placed one in our offer `index`."""
        self._inbox.append((kind, index, byte_len))

    def repost(self, slot):
        """Give receive slot `slot` back to the device (cv held)."""
        try:
            self._resources.post_recv(slot)
        except (VerbsError, ValueError) as exc:
            if not self._state.closed:
                self._state.fail(ConnectionClosed(f"receive from {self._state.peer}: cannot repost a "
                                                  f"receive: {exc}"))

    # ---- the reader ------------------------------------------------------------------------
    def recv_header(self, idle_timeout):
        with self._lock:
            with self._state.cv:
                if self._current is not None:
                    raise ProtocolError(f"recv_header from {self._state.peer} before the last payload was "
                                        f"received")
                deadline = time.monotonic() + idle_timeout
                while not self._inbox:
                    if self._state.closed or self._state.error is not None:
                        self._state.check("receive from")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._state.sleep(left)
                kind, index, byte_len = self._inbox.popleft()
            if kind == K_PLACED:
                return self._placed_header(index)
            return self._frame_header(kind, index, byte_len)

    def _frame_header(self, kind, slot, byte_len):
        frame = self._resources.receive_slot(slot)
        _, _, _, ident, _, _ = PREFIX.unpack_from(frame)
        header = protocol.unpack(bytes(frame[PREFIX.size:PREFIX.size + protocol.HEADER_SIZE]))
        carried = byte_len - PREFIX.size - protocol.HEADER_SIZE
        try:
            (self._eager if kind == K_EAGER else self._rendezvous).check(header, carried)
        except ProtocolError:
            self._consumed(slot)
            raise
        if kind == K_RNDV or header.length == 0:
            self._consumed(slot)
            if header.length:
                self._current = (None, kind, ident)
                self._current_here = 0
        else:
            self._current = (slot, kind, ident)
            self._current_here = header.length
        return header

    def _placed_header(self, ident):
        """The header of a message the peer wrote into our offer `ident`."""
        self._consumed(None)
        header = self._offers.placed_header(ident)
        self._current = (None, K_PLACED, ident)
        self._current_here = header.length
        return header

    def _consumed(self, slot):
        """Give a message's receive slot (if it holds one) back to the device and its credit back to the peer."""
        with self._state.cv:
            if slot is not None:
                self.repost(slot)
            self._flow.consumed()
        self._sender.return_credits(block=True)

    def recv_payload(self, header, destination):
        with self._lock:
            if self._current is None:
                raise ProtocolError(f"recv_payload from {self._state.peer} without a pending header")
            slot, kind, ident = self._current
            self._current = None
            dest = memoryview(destination).cast("B")
            if dest.nbytes != header.length:
                raise ValueError(f"destination of {dest.nbytes} bytes for a {header.length}-byte payload")
            if kind == K_EAGER:
                self._eager.receive(slot, header.length, dest)
                self._consumed(slot)
            elif kind == K_PLACED:
                self._offers.receive(ident, header.length, dest)
            else:
                self._rendezvous.receive(ident, header.length, dest)

    def readable_bytes(self):
        """Bytes here now: each waiting message's header and the payload that came
        with it in its receive slot (eager) or was written in place (placed); a
        rendezvous payload is not here until asked for."""
        with self._state.cv:
            if self._state.closed:
                raise ConnectionClosed(f"receive from {self._state.peer}: connection closed")
            n = self._current_here if self._current is not None else 0
            for kind, index, byte_len in self._inbox:
                n += protocol.HEADER_SIZE
                if kind == K_EAGER:
                    n += byte_len - PREFIX.size - protocol.HEADER_SIZE
                elif kind == K_PLACED:
                    n += self._offers.placed_length(index)
            if not n and self._state.error is not None:
                raise self._state.error
            return n
