"""Progress for one verbs connection: the thread that waits on the CQ (spin
briefly, then sleep on the completion channel, GIL released), hands each
completion to the part it belongs to and wakes the waiters, and between
completions reads the side channel for the peer's goodbye or death.

The thread starts only when someone first has to wait; until then (an
accepted connection still in the authentication handshake) reap_now() does
the same work without waiting, so such a connection costs no thread."""
import logging
import socket
import threading
from contextlib import contextmanager

from rdmakv.core import protocol
from rdmakv.core.errors import ConnectionClosed, EndOfStream, ProtocolError, RdmaKVError, TransportError
from rdmakv.transport.verbs.frames import (K_CREDIT, K_CTS, K_EAGER, K_OFFER, K_PLACED, K_RNDV, OFFER,
                                           PLACED_BIT, PREFIX)
from rdmakv.transport.verbs.resources import RX, TAG_MASK, TX, WRITE

log = logging.getLogger("rdmakv.transport.verbs")

PROGRESS_SLICE = 0.1         # seconds the progress thread sleeps before checking liveness
SPIN_US = 30.0               # how long it polls the CQ before sleeping on the channel
_OPERATIONS = {RX: "receive from", TX: "send to", WRITE: "RDMA write to"}   # for a failed completion


def _t():
    from rdmakv.native import transport
    return transport


class Progress:
    def __init__(self, state, resources, side_channel, flow, sender, receiver, rendezvous, offers):
        self._state = state
        self._cq = resources.cq
        self._resources = resources
        self._side_channel = side_channel
        self._flow = flow
        self._sender = sender
        self._receiver = receiver
        self._rendezvous = rendezvous
        self._offers = offers
        self._reap_lock = threading.Lock()   # whoever reaps the CQ before the progress thread runs
        self._thread = None
        self._enabled = False          # the set-up is complete
        self._stopped = False          # the connection is being released
        self._peer_said_bye = False

    @property
    def enabled(self):
        return self._enabled

    @property
    def running(self):
        return self._thread is not None

    @property
    def peer_said_bye(self):
        return self._peer_said_bye

    def enable(self):
        """The set-up is complete: completions may be taken in from now on."""
        self._enabled = True

    def start(self):
        """Start the progress thread, once, when someone has to wait."""
        with self._state.cv:
            if self._thread is None and self._enabled and not self._stopped:
                self._thread = threading.Thread(target=self._run, name=f"rdmakv-verbs-{self._state.peer}",
                                                daemon=True)
                self._thread.start()

    def stop(self):
        """No thread starts and no reap runs from now on; False if already stopped."""
        with self._state.cv:
            if self._stopped:
                return False
            self._stopped = True
            return True

    def join(self, timeout):
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def alive_elsewhere(self):
        """The progress thread still runs (stuck in a wait), and this is another thread."""
        return (self._thread is not None and self._thread.is_alive()
                and self._thread is not threading.current_thread())

    @contextmanager
    def reaping_excluded(self):
        """No reap_now() runs inside."""
        with self._reap_lock:
            yield

    def reap_now(self):
        """Without a progress thread: take in what completed and look at the side
        channel, without waiting."""
        with self._reap_lock:
            if self._thread is not None or self._stopped or not self._enabled:
                return
            self._drain_cq()
            with self._state.cv:
                alive = self._state.error is None
            if alive:
                self._check_liveness()

    # ---- the thread ---------------------------------------------------------------------
    def _run(self):
        with self._reap_lock:
            pass                        # a reap begun before this thread existed ends first
        try:
            while not self._state.closed:
                wcs = self._cq.wait(PROGRESS_SLICE, max_entries=32, spin_us=SPIN_US, check=False)
                if wcs:
                    self._dispatch(wcs)     # after a failure too: flushed completions free slots
                elif self._state.error is None:
                    self._check_liveness()
        except Exception as exc:  # noqa: BLE001 - the connection fails, the process goes on
            if not self._state.closed:
                log.exception("verbs progress for %s failed", self._state.peer)
                self._state.fail(TransportError(f"verbs progress for {self._state.peer} failed: {exc}"))

    def _check_liveness(self):
        try:
            data = self._side_channel.recv(16, socket.MSG_DONTWAIT)   # (select() fails past descriptor 1023)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data = None
            reason = exc.strerror or str(exc)
        else:
            reason = "closed its side channel"
        peer = self._state.peer
        if data and b"B" in data:
            self._peer_said_bye = True
            # Everything it sent completed before it said goodbye: reap it first.
            self._drain_cq()
            self._state.fail(EndOfStream(f"{peer} closed the connection"))
        elif not data:
            self._drain_cq()
            self._state.fail(ConnectionClosed(f"connection to {peer} lost: the peer {reason} (process died?)"))

    def _drain_cq(self):
        while True:
            wcs = self._cq.poll(64)
            if not wcs:
                return
            self._dispatch(wcs)

    # ---- completion dispatch ------------------------------------------------------------
    def _dispatch(self, wcs):
        """Hand each completion to its part, then wake every waiter."""
        with self._state.cv:
            for wc in wcs:
                tag, index = wc.wr_id & TAG_MASK, wc.wr_id & ~TAG_MASK
                if not wc.ok:
                    if self._state.error is None:
                        self._state.fail(self._wc_error(wc, _OPERATIONS.get(tag, "verbs op with")))
                    if tag == WRITE:
                        self._sender.write_completed(index, self._state.error)
                elif tag == TX:
                    self._flow.slot_free(index)
                elif tag == WRITE:
                    self._sender.write_completed(index, None)
                elif tag == RX:
                    self._received(wc, index)
            self._state.cv.notify_all()
        try:
            self._sender.return_credits(block=False)     # for the offers taken in above
        except RdmaKVError:
            pass   # the connection just failed or closed: its users hear why from it

    def _received(self, wc, slot):
        """What a completed receive in `slot` brought (cv held)."""
        if wc.opcode == _t().IBV_WC_RECV_RDMA_WITH_IMM:
            if wc.imm_data & PLACED_BIT:
                self._receiver.arrived(K_PLACED, wc.imm_data & ~PLACED_BIT, 0)
            else:
                self._rendezvous.written(wc.imm_data)
            self._receiver.repost(slot)
            return
        frame = self._resources.receive_slot(slot)
        kind, _, credits, ident, rkey, addr = PREFIX.unpack_from(frame)
        self._flow.granted(credits)
        if kind == K_CTS:
            self._rendezvous.cleared(ident, addr, rkey)
            self._receiver.repost(slot)
        elif kind == K_CREDIT:
            self._receiver.repost(slot)
        elif kind in (K_EAGER, K_RNDV) and wc.byte_len >= PREFIX.size + protocol.HEADER_SIZE:
            self._receiver.arrived(kind, slot, wc.byte_len)
        elif kind == K_OFFER and wc.byte_len == PREFIX.size + OFFER.size:
            self._offers.take(frame, ident, rkey, addr)    # reads the frame before the slot is reposted
            self._receiver.repost(slot)
            self._flow.consumed()
        else:
            self._state.fail(ProtocolError(f"{self._state.peer} sent a malformed verbs frame (kind {kind}, "
                                           f"{wc.byte_len} bytes)"))

    def _wc_error(self, wc, operation):
        exc = wc.error((wc,))
        exc.args = (f"{operation} {self._state.peer} failed: {wc.status_str} (status {wc.status}, "
                    f"vendor_err {wc.vendor_err:#x}, wr_id {wc.wr_id & ~TAG_MASK})",)
        return exc
