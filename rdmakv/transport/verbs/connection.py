"""One verbs connection: an RC queue pair to one peer, composed of its parts
(see the package's documentation for the protocols):

    state.py       the Condition, failure and bounded waits every part shares
    resources.py   the verbs objects and slots, and all posting
    credits.py     flow control: send slots, credits, credits owed
    sender.py      frames out, RDMA writes out
    eager.py, rendezvous.py, offers.py   each protocol's send and receive path
    receiver.py    the messages that arrived, in order, and how each is taken in
    progress.py    the progress thread: completions to their parts, liveness

This class sets the connection up, picks a protocol for each send, and tears
everything down."""
import socket
import time

from rdmakv.core import netif, protocol
from rdmakv.core.errors import ProtocolError
from rdmakv.transport.base import Connection, Features
from rdmakv.transport.verbs.credits import FlowControl
from rdmakv.transport.verbs.eager import Eager
from rdmakv.transport.verbs.frames import EAGER_LIMIT
from rdmakv.transport.verbs.offers import Offers
from rdmakv.transport.verbs.progress import Progress
from rdmakv.transport.verbs.receiver import Receiver
from rdmakv.transport.verbs.rendezvous import Rendezvous
from rdmakv.transport.verbs.resources import ConnectionResources
from rdmakv.transport.verbs.sender import Sender
from rdmakv.transport.verbs.state import ConnectionState

CLOSE_DRAIN_SECONDS = 2.0    # close() lets SENDs already posted complete for at most this long


class VerbsConnection(Connection):
    """One RC QP to one peer, with its TCP side channel (see the module doc)."""

    features = Features(places=True)

    def __init__(self, sock, timeout):
        """Allocate everything for one peer (PD, CQ, QP, registered slots) and
        post the receives; connect(), or the listener once the peer's endpoint
        is in, then walks the QP to RTS (connect_qp) and declares it ready
        (mark_ready)."""
        self._sock = sock
        try:
            address = sock.getpeername()
            self.peer, self.source = netif.format_address(*address[:2]), address[0]
        except OSError:
            self.peer = "?"
        self._state = ConnectionState(self.peer, timeout, start_progress=self.start_progress)
        try:
            self._resources = ConnectionResources()
        except BaseException:
            sock.close()
            raise
        self.endpoint = self._resources.endpoint
        self._flow = FlowControl(self._state)
        self._sender = Sender(self._state, self._resources, self._flow)
        self._eager = Eager(self._state, self._resources, self._sender)
        self._rendezvous = Rendezvous(self._state, self._resources, self._sender)
        self._offers = Offers(self._state, self._resources, self._flow, self._sender)
        self._receiver = Receiver(self._state, self._resources, self._flow, self._sender, self._eager,
                                  self._rendezvous, self._offers)
        self._progress = Progress(self._state, self._resources, sock, self._flow, self._sender, self._receiver,
                                  self._rendezvous, self._offers)

    # ---- set-up --------------------------------------------------------------------
    def connect_qp(self, theirs, what):
        """Walk the QP to RTS, connected to the peer's endpoint (a checked set-up message)."""
        if "ring" in theirs:
            raise ProtocolError(f"{what}: the peer answered with a stream's set-up, not the Python data path's")
        self._resources.connect(theirs, what)
        self._flow.connected(theirs["slots"])

    def mark_ready(self):
        """Both QPs are connected (the ready bytes were traded): the side channel
        now only tells of the peer's goodbye or death."""
        self._sock.setblocking(False)
        self._progress.enable()

    def start_progress(self):
        """Start the progress thread (once) now rather than at the first wait."""
        self._progress.start()

    # ---- what moved, and how (payload bytes, both ways) ------------------------------
    @property
    def copied_bytes(self):
        """Through bounce slots, or out of an offered buffer to another destination."""
        return self._eager.copied_bytes + self._offers.copied_bytes

    @property
    def rendezvous_bytes(self):
        """Zero copy by RDMA write after a clear-to-send."""
        return self._rendezvous.moved_bytes

    @property
    def placed_bytes(self):
        """Written straight into offered buffers."""
        return self._offers.placed_bytes

    # ---- the transport contract ------------------------------------------------------
    def send(self, header, payload=None, in_place=False):
        if in_place:
            raise ValueError("a verbs connection has no shared regions to send in place")
        view = None
        n = 0
        if payload is not None:
            view = memoryview(payload)
            if not view.contiguous:
                raise ValueError("payload must be a contiguous buffer")
            view = view.cast("B")
            n = view.nbytes
        if len(header) != protocol.HEADER_SIZE:
            raise ProtocolError(f"header is {len(header)} bytes, expected {protocol.HEADER_SIZE}")
        self._count_sent(len(header) + n)
        if n <= EAGER_LIMIT:
            self._eager.send(header, view, n)
            return
        tag = protocol.tag_of_frame(header)
        with self._state.cv:
            self._state.check("send to")
            offer = self._offers.claim(tag, n)
            ident = self._sender.new_message_id()
        deadline = time.monotonic() + self._state.timeout
        with self._resources.mr_cache.lease(view, 0) as mr:     # local access only: the peer never reads us
            if offer is not None:
                self._offers.send(header, mr, n, ident, offer, deadline)
            else:
                self._rendezvous.send(header, mr, n, ident, deadline)

    def offer(self, tag, buffer):
        self._offers.offer(tag, buffer)

    def recv_header(self, idle_timeout):
        header = self._receiver.recv_header(idle_timeout)
        if header is not None:
            self.received_bytes += protocol.HEADER_SIZE     # one reader at a time
        return header

    def recv_payload(self, header, destination):
        self._receiver.recv_payload(header, destination)
        self.received_bytes += header.length

    def _count_sent(self, nbytes):
        with self._state.cv:           # senders run concurrently here
            self.sent_bytes += nbytes

    def readable_bytes(self):
        self._progress.reap_now()
        return self._receiver.readable_bytes()

    # ---- teardown ---------------------------------------------------------------------------
    def close(self):
        if self._state.closed:
            return
        # Let SENDs already posted reach the peer before the QP goes.
        drain_until = time.monotonic() + min(self._state.timeout, CLOSE_DRAIN_SECONDS)
        while time.monotonic() < drain_until:
            self._progress.reap_now()        # where no progress thread does it
            with self._state.cv:
                if self._flow.all_slots_free() or self._state.error is not None or not self._progress.enabled:
                    break
                self._state.cv.wait(0.05 if self._progress.running else 0.005)
        if not self._state.mark_closed():
            return
        try:
            if not self._progress.peer_said_bye:
                self._sock.setblocking(True)
                self._sock.settimeout(0.5)
                self._sock.sendall(b"B")
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._progress.join(5.0)
        self.release()

    def release(self):
        """Destroy everything and close the side channel, without a goodbye (close()
        says it first; the listener calls this for a set-up it refuses).  Once."""
        with self._state.cv:
            if not self._progress.stop():
                return
            self._state.mark_closed()
        if self._progress.alive_elsewhere():
            return  # the progress thread is stuck in a wait; leave the handles to the process' end
        with self._progress.reaping_excluded():
            self._resources.close()
        self._sock.close()

    def __repr__(self):
        return f"<VerbsConnection to {self.peer}{' closed' if self._state.closed else ''}>"
