"""One verbs connection: an RC queue pair to one peer, with its receive and
send slots, credits, the eager, placed and rendezvous protocols and the
progress thread (see the package's documentation)."""
import logging
import mmap
import socket
import threading
import time
from collections import deque, namedtuple

from rdmakv.core import netif, protocol
from rdmakv.core.errors import (ConnectionClosed, EndOfStream, PeerTimeout, ProtocolError, RdmaKVError,
                                TransportError, VerbsError)
from rdmakv.transport.base import Connection
from rdmakv.transport.verbs import qp as verbs_qp
from rdmakv.transport.verbs.devices import SharedDevice
from rdmakv.transport.verbs.frames import (CTRL_SLOTS, DATA_SLOTS, EAGER_LIMIT, K_CREDIT, K_CTS, K_EAGER, K_OFFER,
                                           K_PLACED, K_RNDV, OFFER, OFFER_HEADER_BYTES, OFFER_SLOTS, PLACED_BIT,
                                           PREFIX, SEND_SLOTS, SLOT_BYTES)
from rdmakv.transport.verbs.mrcache import MRCache, buffer_span

log = logging.getLogger("rdmakv.transport.verbs")

MR_CACHE_BYTES = 512 << 20   # per connection
WRITE_PIECE = 1 << 30        # one RDMA write moves at most this much
PROGRESS_SLICE = 0.1         # seconds the progress thread sleeps before checking liveness

# wr_id tags (top bits) for the three kinds of work request
_RX, _TX, _WRITE = 1 << 40, 2 << 40, 3 << 40
_TAG_MASK = 0xFF << 40

# A buffer of ours the peer may write one message into: `match` is (op, key, chunk).
_Offer = namedtuple("_Offer", "match round view pin")
# Where the peer wants its next (op, key, chunk) message of `round`.
_PeerOffer = namedtuple("_PeerOffer", "round ident length addr rkey header_addr header_rkey")


def _t():
    from rdmakv.native import transport
    return transport


def _slab(nbytes):
    """Dedicated page-aligned anonymous memory (safe to register even where
    ibv_fork_init marks registered pages MADV_DONTFORK)."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


# --- the connection -------------------------------------------------------------------

class VerbsConnection(Connection):
    """One RC QP to one peer, with its TCP side channel (see the module doc)."""

    places_remotely = True

    def __init__(self, sock, timeout):
        """Allocate everything for one peer (PD, CQ, QP, registered slots) and
        post the receives; connect(), or the listener once the peer's endpoint
        is in, then walks the QP to RTS (_connect) and declares it ready (_ready)."""
        self._sock = sock
        self._timeout = timeout
        try:
            address = sock.getpeername()
            self.peer, self.source = netif.format_address(*address[:2]), address[0]
        except OSError:
            self.peer = "?"
        self.copied_bytes = 0          # payload bytes copied through bounce slots (both ways)
        self.rendezvous_bytes = 0      # payload bytes moved zero-copy by RDMA write (both ways)
        self.placed_bytes = 0          # payload bytes written straight into offered buffers (both ways)
        self._cv = threading.Condition()
        self._post_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._reap_lock = threading.Lock()   # whoever reaps the CQ before the progress thread runs
        self._closed = False           # close() was called here
        self._error = None             # why the connection is unusable (ConnectionClosed, ...)
        self._peer_said_bye = False
        self._released = False
        self._inbox = deque()          # (slot, byte_len) of received eager/rendezvous frames
        self._current = None           # (slot, kind, id) of the frame whose header recv_header returned
        self._current_here = 0         # bytes of that frame's payload already here
        self._cts = {}                 # message id -> (addr, rkey) from the peer
        self._writes_in = set()        # ids whose write-with-imm arrived here
        self._writes_done = {}         # id -> None or error, our writes' completions
        self._free_tx = list(range(SEND_SLOTS))
        self._credits = 0              # messages we may still send
        self._to_return = 0            # consumed slots whose credit the peer has not got back
        self._next_id = 1
        self._offers_out = {}          # offer id -> _Offer: buffers of ours the peer may write into
        self._offer_ids = {}           # (op, key, chunk) -> our newest offer id for it
        self._free_offer_ids = deque(range(OFFER_SLOTS))   # FIFO, so a retired id is reused last
        self._offers_in = {}           # (op, key, chunk) -> _PeerOffer
        self._ready_now = False        # the set-up is complete
        self._thread = None            # the progress thread: started by the first wait (see _ensure_progress)
        self._have_device = False
        self._qp = self._cq = self._channel = self._pd = None
        self._rx_mr = self._tx_mr = self._offer_mr = None
        self._mrs = None
        try:
            self._allocate()
        except BaseException:
            self._release()
            raise

    # ---- set-up --------------------------------------------------------------------
    def _allocate(self):
        t = _t()
        ctx, port = SharedDevice.acquire()
        self._have_device = True
        self._port = port
        self._pd = t.PD(ctx)
        self._channel = t.CompChannel(ctx)
        rx_slots = DATA_SLOTS + CTRL_SLOTS
        self._cq = t.CQ(ctx, rx_slots + SEND_SLOTS + 64, self._channel)
        self._qp = t.QP(self._pd, self._cq, max_send_wr=SEND_SLOTS + 32, max_recv_wr=rx_slots,
                        max_inline_data=256)
        self._inline = self._qp.max_inline_data
        self._rx = _slab(rx_slots * SLOT_BYTES)
        self._tx = _slab(SEND_SLOTS * SLOT_BYTES)
        self._rxv, self._txv = memoryview(self._rx), memoryview(self._tx)
        self._rx_mr = t.MR(self._pd, self._rx, t.IBV_ACCESS_LOCAL_WRITE)
        self._tx_mr = t.MR(self._pd, self._tx, 0)
        self._mrs = MRCache(self._pd, MR_CACHE_BYTES)
        self._access = t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE
        self._offer_headers = _slab(OFFER_SLOTS * OFFER_HEADER_BYTES)
        self._offer_mr = t.MR(self._pd, self._offer_headers, self._access)
        # Receives can be posted from INIT on, so they are there before the peer may send.
        self._qp.modify(t.IBV_QPS_INIT, pkey_index=0, port_num=port.port, qp_access_flags=self._access)
        for slot in range(rx_slots):
            self._post_rx(slot)
        self._psn = verbs_qp.new_psn()
        self.endpoint = dict(verbs_qp.local_endpoint(self._qp, port, self._psn), slots=DATA_SLOTS,
                             slot_bytes=SLOT_BYTES)

    def _connect(self, theirs, what):
        """Walk the QP to RTS, connected to the peer's endpoint (a checked set-up message)."""
        if theirs.get("gid") is None and self._port.gid_index is not None:
            raise ProtocolError(f"{what}: this port is RoCE but the peer sent no GID")
        verbs_qp.connect_rc(self._qp, self._port, theirs, self._psn, access=self._access)
        self._credits = theirs["slots"]

    def _ready(self):
        """Both QPs are connected (the ready bytes were traded): the side channel
        now only tells of the peer's goodbye or death."""
        self._sock.setblocking(False)
        self._ready_now = True

    def _ensure_progress(self):
        """Start the progress thread, once, when someone has to wait.  Until then
        (an accepted connection still in the handshake, node.Gate) readable_bytes()
        reaps completions itself, so such a connection costs no thread."""
        with self._cv:
            if self._thread is None and self._ready_now and not self._released:
                self._thread = threading.Thread(target=self._progress, name=f"rdmakv-verbs-{self.peer}",
                                                daemon=True)
                self._thread.start()

    def _reap_now(self):
        """Without a progress thread: take in what completed and look at the side
        channel, without waiting."""
        with self._reap_lock:
            if self._thread is not None or self._released or not self._ready_now:
                return
            self._drain_cq()
            with self._cv:
                alive = self._error is None
            if alive:
                self._check_liveness()

    def _post_rx(self, slot):
        self._qp.post_recv(self._rx_mr, slot * SLOT_BYTES, SLOT_BYTES, wr_id=_RX | slot)

    # ---- failure -----------------------------------------------------------------------
    def _fail(self, error):
        """Make the connection unusable with `error`; wakes every waiter."""
        with self._cv:
            if self._error is None:
                self._error = error
            self._cv.notify_all()

    def _check(self, what):
        """Raise the reason this connection can't be used, if any (cv held)."""
        if self._closed:
            raise ConnectionClosed(f"{what} {self.peer}: connection closed")
        if self._error is not None:
            raise self._error

    def _wait(self, ready, what, deadline=None):
        """Wait (cv held) until ready() is true, the connection fails or the deadline passes."""
        deadline = deadline if deadline is not None else time.monotonic() + self._timeout
        while True:
            self._check(what)
            if ready():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"{what} {self.peer}: no progress for {self._timeout:g} s (RDMAKV_TIMEOUT)")
            self._ensure_progress()
            self._cv.wait(left)

    def _wc_error(self, wc, operation):
        exc = wc.error((wc,))
        exc.args = (f"{operation} {self.peer} failed: {wc.status_str} (status {wc.status}, "
                    f"vendor_err {wc.vendor_err:#x}, wr_id {wc.wr_id & ~_TAG_MASK})",)
        return exc

    # ---- the progress thread ----------------------------------------------------------
    def _progress(self):
        with self._reap_lock:
            pass                        # a reap begun before this thread existed ends first
        try:
            while not self._closed:
                wcs = self._cq.wait(PROGRESS_SLICE, max_entries=32, spin_us=30.0, check=False)
                if wcs:
                    self._dispatch(wcs)     # after a failure too: flushed completions free slots
                elif self._error is None:
                    self._check_liveness()
        except Exception as exc:  # noqa: BLE001 - the connection fails, the process goes on
            if not self._closed:
                log.exception("verbs progress for %s failed", self.peer)
                self._fail(TransportError(f"verbs progress for {self.peer} failed: {exc}"))

    def _check_liveness(self):
        try:
            data = self._sock.recv(16, socket.MSG_DONTWAIT)   # (select() fails past descriptor 1023)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data = None
            reason = exc.strerror or str(exc)
        else:
            reason = "closed its side channel"
        if data and b"B" in data:
            self._peer_said_bye = True
            # Everything it sent completed before it said goodbye: reap it first.
            self._drain_cq()
            self._fail(EndOfStream(f"{self.peer} closed the connection"))
        elif not data:
            self._drain_cq()
            self._fail(ConnectionClosed(f"connection to {self.peer} lost: the peer {reason} (process died?)"))

    def _drain_cq(self):
        while True:
            wcs = self._cq.poll(64)
            if not wcs:
                return
            self._dispatch(wcs)

    def _dispatch(self, wcs):
        t = _t()
        with self._cv:
            for wc in wcs:
                tag, index = wc.wr_id & _TAG_MASK, wc.wr_id & ~_TAG_MASK
                if not wc.ok:
                    if self._error is None:
                        op = {_RX: "receive from", _TX: "send to", _WRITE: "RDMA write to"}.get(tag, "verbs op with")
                        self._error = self._wc_error(wc, op)
                    if tag == _WRITE:
                        self._writes_done[index] = self._error
                    continue
                if tag == _TX:
                    self._free_tx.append(index)
                elif tag == _WRITE:
                    self._writes_done[index] = None
                elif tag == _RX:
                    if wc.opcode == t.IBV_WC_RECV_RDMA_WITH_IMM:
                        if wc.imm_data & PLACED_BIT:
                            self._inbox.append((K_PLACED, wc.imm_data & ~PLACED_BIT, 0))
                        else:
                            self._writes_in.add(wc.imm_data)
                        self._repost(index)
                        continue
                    kind, _, credits, ident, rkey, addr = PREFIX.unpack_from(self._rx, index * SLOT_BYTES)
                    self._credits += credits
                    if kind == K_CTS:
                        self._cts[ident] = (addr, rkey)
                        self._repost(index)
                    elif kind == K_CREDIT:
                        self._repost(index)
                    elif kind in (K_EAGER, K_RNDV) and wc.byte_len >= PREFIX.size + protocol.HEADER_SIZE:
                        self._inbox.append((kind, index, wc.byte_len))
                    elif kind == K_OFFER and wc.byte_len == PREFIX.size + OFFER.size:
                        self._take_offer(index, ident, rkey, addr)
                    else:
                        self._error = ProtocolError(f"{self.peer} sent a malformed verbs frame (kind {kind}, "
                                                    f"{wc.byte_len} bytes)")
            self._cv.notify_all()
        try:
            self._send_owed_credits(block=False)     # for the offers taken in above
        except RdmaKVError:
            pass   # the connection just failed or closed: its users hear why from it

    def _repost(self, slot):
        try:
            self._post_rx(slot)
        except (VerbsError, ValueError) as exc:
            if self._error is None and not self._closed:
                self._error = ConnectionClosed(f"receive from {self.peer}: cannot repost a receive: {exc}")

    # ---- sending ---------------------------------------------------------------------------
    def _post_frame(self, kind, ident, header=b"", payload=None, n=0, rkey=0, addr=0, uses_credit=True,
                    what="send to", block=True):
        """Copy one frame into a send slot and SEND it (cv held while waiting for a slot/credit).
        With block=False, send nothing rather than wait for a slot."""
        with self._cv:
            if not block and not self._free_tx:
                return 0
            self._wait(lambda: self._free_tx and (self._credits > 0 or not uses_credit), what)
            slot = self._free_tx.pop()
            if uses_credit:
                self._credits -= 1
            credits, self._to_return = min(self._to_return, 0xFFFF), max(0, self._to_return - 0xFFFF)
        base = slot * SLOT_BYTES
        PREFIX.pack_into(self._tx, base, kind, 0, credits, ident, rkey, addr)
        end = base + PREFIX.size
        if header:
            self._txv[end:end + len(header)] = header
            end += len(header)
        if n:
            self._txv[end:end + n] = payload
            end += n
        length = end - base
        with self._post_lock:
            try:
                self._qp.post_send(self._tx_mr, base, length, wr_id=_TX | slot, inline=length <= self._inline)
            except (VerbsError, ValueError) as exc:
                self._fail(ConnectionClosed(f"{what} {self.peer}: {exc}"))
                with self._cv:
                    self._check(what)
                raise
        return n

    def send(self, header, payload=None):
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
        if n <= EAGER_LIMIT:
            self._post_frame(K_EAGER, 0, header, view, n)
            with self._cv:
                self.copied_bytes += n
            return
        _, _, op, _, _, key, chunk, _, rnd, _, _ = protocol.HEADER.unpack(header)
        with self._cv:
            self._check("send to")
            offer = self._offers_in.get((op, key, chunk))
            if offer is not None and offer.round == rnd and offer.length == n:
                del self._offers_in[(op, key, chunk)]
            else:
                offer = None
            ident = self._next_id
            self._next_id = self._next_id % (PLACED_BIT - 1) + 1
        deadline = time.monotonic() + self._timeout
        with self._mrs.lease(view, 0) as mr:
            if offer is not None:
                self._send_placed(header, mr, n, ident, offer, deadline)
            else:
                self._send_rendezvous(header, mr, n, ident, deadline)

    def _send_placed(self, header, mr, n, ident, offer, deadline):
        """Write the header into the peer's table entry for the offer and the
        payload into the offered buffer; the immediate names the offer."""
        with self._cv:
            self._wait(lambda: self._free_tx and self._credits > 0, "send to", deadline)
            slot = self._free_tx.pop()
            self._credits -= 1
        base = slot * SLOT_BYTES
        self._txv[base:base + protocol.HEADER_SIZE] = header
        # On failure the slot stays taken: the NIC may still read it, and the connection is dead.
        self._write(mr, n, offer.addr, offer.rkey, ident, PLACED_BIT | offer.ident, deadline,
                    header_write=(base, offer.header_addr, offer.header_rkey))
        with self._cv:
            self._free_tx.append(slot)
            self.placed_bytes += n
            self._cv.notify_all()

    def _send_rendezvous(self, header, mr, n, ident, deadline):
        """Send the header alone, wait for clear-to-send, then write the payload there."""
        self._post_frame(K_RNDV, ident, header)
        with self._cv:
            self._wait(lambda: ident in self._cts, "clear-to-send from", deadline)
            addr, rkey = self._cts.pop(ident)
        self._write(mr, n, addr, rkey, ident, ident, deadline)
        with self._cv:
            self.rendezvous_bytes += n

    def _write(self, mr, n, addr, rkey, ident, imm, deadline, header_write=None):
        """RDMA-write mr's n bytes to (addr, rkey), the last piece with `imm`, and
        wait for completion.  header_write=(tx slot offset, addr, rkey) first
        writes a message header from that send slot (RC keeps the order)."""
        with self._post_lock:
            try:
                if header_write is not None:
                    base, header_addr, header_rkey = header_write
                    self._qp.post_write(self._tx_mr, base, protocol.HEADER_SIZE, header_addr, header_rkey,
                                        wr_id=_WRITE | ident, signaled=False,
                                        inline=protocol.HEADER_SIZE <= self._inline)
                offset = 0
                while offset < n:
                    piece = min(WRITE_PIECE, n - offset)
                    last = offset + piece == n
                    self._qp.post_write(mr, offset, piece, addr + offset, rkey, wr_id=_WRITE | ident,
                                        imm=imm if last else None, signaled=last)
                    offset += piece
            except (VerbsError, ValueError) as exc:
                self._fail(ConnectionClosed(f"RDMA write to {self.peer}: {exc}"))
                raise self._error from None
        with self._cv:
            try:
                self._wait(lambda: ident in self._writes_done, "RDMA write to", deadline)
            finally:
                error = self._writes_done.pop(ident, None)
            if error is not None:
                raise error

    # ---- offers ------------------------------------------------------------------------
    def offer(self, op, key, chunk, round, buffer):
        """Register `buffer` for remote write and tell the peer to write its
        next (op, key, chunk) message of `round` straight into it."""
        view = memoryview(buffer)
        if not view.contiguous or view.nbytes <= EAGER_LIMIT:
            return                    # small messages are cheaper through the eager slots
        view = view.cast("B")
        match = (op, key, chunk)
        with self._cv:
            # Offers are advice: without one the message comes by rendezvous, where
            # a broken connection reports itself.
            if self._closed or self._error is not None or not self._free_offer_ids:
                return
            ident = self._free_offer_ids.popleft()
        t = _t()
        try:
            pin = self._mrs.pin(view, t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE)
        except BaseException:
            with self._cv:
                self._free_offer_ids.append(ident)
            raise
        with self._cv:
            self._offers_out[ident] = _Offer(match, round, view, pin)
            replaced = self._offer_ids.get(match)
            self._offer_ids[match] = ident
        if replaced is not None:
            self._retire_offer(replaced)
        entry = self._offer_mr.addr + ident * OFFER_HEADER_BYTES
        body = OFFER.pack(op, key, chunk, round, view.nbytes, entry, self._offer_mr.rkey)
        self._post_frame(K_OFFER, ident, body, rkey=pin[1].rkey, addr=pin[1].addr, what="offer to")

    def _retire_offer(self, ident):
        """Forget our offer `ident` and unpin its buffer; returns it (or None)."""
        with self._cv:
            offer = self._offers_out.pop(ident, None)
            if offer is None:
                return None
            if self._offer_ids.get(offer.match) == ident:
                del self._offer_ids[offer.match]
            self._free_offer_ids.append(ident)
        self._mrs.unpin(offer.pin)
        return offer

    def _take_offer(self, slot, ident, rkey, addr):
        """Record the peer's offer in receive slot `slot` (progress thread, cv
        held): at once, so a sender sees it whatever its reader is doing."""
        op, key, chunk, rnd, length, header_addr, header_rkey = OFFER.unpack_from(self._rx,
                                                                                 slot * SLOT_BYTES + PREFIX.size)
        self._repost(slot)
        self._to_return += 1
        if length <= EAGER_LIMIT or ident >= OFFER_SLOTS:
            self._error = self._error or ProtocolError(f"{self.peer} offered a buffer of {length} bytes "
                                                       f"as offer {ident}")
        elif (op, key, chunk) not in self._offers_in and len(self._offers_in) >= OFFER_SLOTS:
            self._error = self._error or ProtocolError(f"{self.peer} offered more than {OFFER_SLOTS} buffers")
        else:
            self._offers_in[(op, key, chunk)] = _PeerOffer(rnd, ident, length, addr, rkey, header_addr,
                                                           header_rkey)

    def _send_owed_credits(self, block):
        """Return credits in a CREDIT frame once enough are owed.  The progress
        thread passes block=False: it must never wait for a send slot."""
        with self._cv:
            if self._to_return < DATA_SLOTS // 4 or self._error is not None or self._closed:
                return
        self._post_frame(K_CREDIT, 0, uses_credit=False, what="credit to", block=block)

    # ---- receiving ------------------------------------------------------------------------
    def recv_header(self, idle_timeout):
        with self._recv_lock:
            with self._cv:
                if self._current is not None:
                    raise ProtocolError(f"recv_header from {self.peer} before the last payload was received")
                deadline = time.monotonic() + idle_timeout
                while not self._inbox:
                    if self._closed or self._error is not None:
                        self._check("receive from")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._ensure_progress()
                    self._cv.wait(left)
                kind, index, byte_len = self._inbox.popleft()
            if kind == K_PLACED:
                return self._placed_header(index)
            return self._frame_header(kind, index, byte_len)

    def _frame_header(self, kind, slot, byte_len):
        base = slot * SLOT_BYTES
        _, _, _, ident, _, _ = PREFIX.unpack_from(self._rx, base)
        start = base + PREFIX.size
        header = protocol.unpack(self._rx[start:start + protocol.HEADER_SIZE])
        carried = byte_len - PREFIX.size - protocol.HEADER_SIZE
        if kind == K_EAGER and carried != header.length:
            self._consumed(slot)
            raise ProtocolError(f"{self.peer}: header says {header.length} payload bytes, frame carries {carried}")
        if kind == K_RNDV and (carried or header.length <= EAGER_LIMIT):
            self._consumed(slot)
            raise ProtocolError(f"{self.peer}: a rendezvous for {header.length} bytes is not allowed")
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
        with self._cv:
            offer = self._offers_out.get(ident)
        if offer is None:
            raise ProtocolError(f"{self.peer} wrote a message into offer {ident}, which is not open")
        start = ident * OFFER_HEADER_BYTES
        header = protocol.unpack(self._offer_headers[start:start + protocol.HEADER_SIZE])
        if ((header.op, header.key, header.chunk) != offer.match or header.round != offer.round
                or header.length != offer.view.nbytes):
            op, key, chunk = offer.match
            raise ProtocolError(
                f"{self.peer} wrote {protocol.op_name(header.op)} key {header.key} chunk {header.chunk} "
                f"round {header.round} ({header.length} bytes) into the buffer offered for "
                f"{protocol.op_name(op)} key {key} chunk {chunk} round {offer.round} ({offer.view.nbytes} bytes)")
        self._current = (None, K_PLACED, ident)
        self._current_here = header.length
        return header

    def _consumed(self, slot):
        """Give a message's receive slot (if it holds one) back to the device and its credit back to the peer."""
        with self._cv:
            if slot is not None:
                self._repost(slot)
            self._to_return += 1
        self._send_owed_credits(block=True)

    def recv_payload(self, header, destination):
        with self._recv_lock:
            if self._current is None:
                raise ProtocolError(f"recv_payload from {self.peer} without a pending header")
            slot, kind, ident = self._current
            self._current = None
            dest = memoryview(destination).cast("B")
            if dest.nbytes != header.length:
                raise ValueError(f"destination of {dest.nbytes} bytes for a {header.length}-byte payload")
            if kind == K_EAGER:
                start = slot * SLOT_BYTES + PREFIX.size + protocol.HEADER_SIZE
                dest[:] = self._rxv[start:start + header.length]
                with self._cv:
                    self.copied_bytes += header.length
                self._consumed(slot)
                return
            if kind == K_PLACED:
                offer = self._retire_offer(ident)
                if offer is None:
                    raise ConnectionClosed(f"receive from {self.peer}: connection closed")
                # The payload is in place; a caller that changed its mind about where it goes gets a copy.
                if buffer_span(dest) != buffer_span(offer.view):
                    dest[:] = offer.view
                    with self._cv:
                        self.copied_bytes += header.length
                with self._cv:
                    self.placed_bytes += header.length
                return
            t = _t()
            with self._mrs.lease(dest, t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE) as mr:
                self._post_frame(K_CTS, ident, rkey=mr.rkey, addr=mr.addr, uses_credit=False,
                                 what="clear-to-send to")
                with self._cv:
                    self._wait(lambda: ident in self._writes_in, "receive from")
                    self._writes_in.discard(ident)
                    self.rendezvous_bytes += header.length

    def readable_bytes(self):
        """Bytes here now: each waiting message's header and the payload that came
        with it in its receive slot (eager) or was written in place (placed); a
        rendezvous payload is not here until asked for."""
        self._reap_now()
        with self._cv:
            if self._closed:
                raise ConnectionClosed(f"receive from {self.peer}: connection closed")
            n = self._current_here if self._current is not None else 0
            for kind, index, byte_len in self._inbox:
                n += protocol.HEADER_SIZE
                if kind == K_EAGER:
                    n += byte_len - PREFIX.size - protocol.HEADER_SIZE
                elif kind == K_PLACED and index in self._offers_out:
                    n += self._offers_out[index].view.nbytes
            if not n and self._error is not None:
                raise self._error
            return n

    # ---- teardown ---------------------------------------------------------------------------
    def close(self):
        with self._cv:
            if self._closed:
                return
        # Let SENDs already posted reach the peer before the QP goes.
        drain_until = time.monotonic() + min(self._timeout, 2.0)
        while time.monotonic() < drain_until:
            self._reap_now()             # where no progress thread does it
            with self._cv:
                if len(self._free_tx) == SEND_SLOTS or self._error is not None or not self._ready_now:
                    break
                self._cv.wait(0.05 if self._thread is not None else 0.005)
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        try:
            if not self._peer_said_bye:
                self._sock.setblocking(True)
                self._sock.settimeout(0.5)
                self._sock.sendall(b"B")
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._release()

    def _release(self):
        """Destroy QP -> CQ -> MRs -> PD -> channel, then drop the device.  Once."""
        with self._cv:
            if self._released:
                return
            self._released = True
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            return  # the progress thread is stuck in a wait; leave the handles to the process' end
        with self._reap_lock:           # not while readable_bytes() reaps
            for obj in (self._qp, self._cq):
                if obj is not None:
                    obj.close()
            if self._mrs is not None:
                self._mrs.close()
            for obj in (self._rx_mr, self._tx_mr, self._offer_mr, self._pd, self._channel):
                if obj is not None:
                    obj.close()
        self._sock.close()
        if self._have_device:
            self._have_device = False
            SharedDevice.release()

    def __repr__(self):
        return f"<VerbsConnection to {self.peer}{' closed' if self._closed else ''}>"
