"""What verbs one connection owns, and the only code that posts work requests:
a protection domain, a completion channel and CQ, an RC QP, the registered
receive and send slots, the offer-header table and the MR cache, on the
process-wide device; destroyed in order, once."""
import mmap
import threading

from rdmakv.core import protocol
from rdmakv.core.errors import ProtocolError
from rdmakv.transport.verbs import qp as verbs_qp
from rdmakv.transport.verbs.devices import SharedDevice
from rdmakv.transport.verbs.frames import (CTRL_SLOTS, DATA_SLOTS, OFFER_HEADER_BYTES, OFFER_SLOTS, SEND_SLOTS,
                                           SLOT_BYTES)
from rdmakv.transport.verbs.mrcache import MRCache

MR_CACHE_BYTES = 512 << 20   # per connection
WRITE_PIECE = 1 << 30        # one RDMA write moves at most this much

# wr_id tags (top bits) for the three kinds of work request; the low bits name
# the receive slot, the send slot or the message
RX, TX, WRITE = 1 << 40, 2 << 40, 3 << 40
TAG_MASK = 0xFF << 40


def _t():
    from rdmakv.native import transport
    return transport


def _slab(nbytes):
    """Dedicated page-aligned anonymous memory (safe to register even where
    ibv_fork_init marks registered pages MADV_DONTFORK)."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class ConnectionResources:
    """Allocates everything for one peer and posts the receives; connect() then
    walks the QP to RTS.  Posting is serialized here (one lock for every
    post_send and post_write), so callers on any thread may post."""

    def __init__(self):
        self._have_device = False
        self._qp = self.cq = self._channel = self._pd = None
        self._rx_mr = self._tx_mr = self._offer_mr = None
        self.mr_cache = None
        self._post_lock = threading.Lock()
        try:
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _allocate(self):
        t = _t()
        ctx, port = SharedDevice.acquire()
        self._have_device = True
        self._port = port
        self._pd = t.PD(ctx)
        self._channel = t.CompChannel(ctx)
        rx_slots = DATA_SLOTS + CTRL_SLOTS
        self.cq = t.CQ(ctx, rx_slots + SEND_SLOTS + 64, self._channel)
        self._qp = t.QP(self._pd, self.cq, max_send_wr=SEND_SLOTS + 32, max_recv_wr=rx_slots,
                        max_inline_data=256)
        self._inline = self._qp.max_inline_data
        self._rx = _slab(rx_slots * SLOT_BYTES)
        self._tx = _slab(SEND_SLOTS * SLOT_BYTES)
        self._rxv, self._txv = memoryview(self._rx), memoryview(self._tx)
        self._rx_mr = t.MR(self._pd, self._rx, t.IBV_ACCESS_LOCAL_WRITE)
        self._tx_mr = t.MR(self._pd, self._tx, 0)
        self.mr_cache = MRCache(self._pd, MR_CACHE_BYTES)
        self.remote_write = t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE   # memory the peer writes into
        self._offer_headers = _slab(OFFER_SLOTS * OFFER_HEADER_BYTES)
        self._offer_mr = t.MR(self._pd, self._offer_headers, self.remote_write)
        # Receives can be posted from INIT on, so they are there before the peer may send.
        self._qp.modify(t.IBV_QPS_INIT, pkey_index=0, port_num=port.port, qp_access_flags=self.remote_write)
        for slot in range(rx_slots):
            self.post_recv(slot)
        self._psn = verbs_qp.new_psn()
        self.endpoint = dict(verbs_qp.local_endpoint(self._qp, port, self._psn), slots=DATA_SLOTS,
                             slot_bytes=SLOT_BYTES)

    def connect(self, theirs, what):
        """Walk the QP to RTS, connected to the peer's endpoint (a checked set-up message)."""
        if theirs.get("gid") is None and self._port.gid_index is not None:
            raise ProtocolError(f"{what}: this port is RoCE but the peer sent no GID")
        verbs_qp.connect_rc(self._qp, self._port, theirs, self._psn, access=self.remote_write)

    # ---- the slots -------------------------------------------------------------------
    def receive_slot(self, slot):
        """Receive slot `slot`: what the peer's SEND put there."""
        return self._rxv[slot * SLOT_BYTES:(slot + 1) * SLOT_BYTES]

    def send_slot(self, slot):
        """Send slot `slot`, for a frame to be copied into."""
        return self._txv[slot * SLOT_BYTES:(slot + 1) * SLOT_BYTES]

    def offer_header_entry(self, ident):
        """(addr, rkey) of offer `ident`'s entry in the table the peer writes a placed message's header into."""
        return self._offer_mr.addr + ident * OFFER_HEADER_BYTES, self._offer_mr.rkey

    def offer_header(self, ident):
        """The header the peer wrote into offer `ident`'s entry."""
        start = ident * OFFER_HEADER_BYTES
        return self._offer_headers[start:start + protocol.HEADER_SIZE]

    # ---- posting ---------------------------------------------------------------------
    def post_recv(self, slot):
        self._qp.post_recv(self._rx_mr, slot * SLOT_BYTES, SLOT_BYTES, wr_id=RX | slot)

    def post_send(self, slot, length):
        """SEND the first `length` bytes of send slot `slot`."""
        with self._post_lock:
            self._qp.post_send(self._tx_mr, slot * SLOT_BYTES, length, wr_id=TX | slot,
                               inline=length <= self._inline)

    def post_write(self, mr, n, addr, rkey, ident, imm, header_write=None):
        """RDMA-write mr's n bytes to (addr, rkey) in pieces, the last signaled and
        carrying `imm`.  header_write=(send slot, addr, rkey) first writes the
        message header from that send slot (RC keeps the order)."""
        with self._post_lock:
            if header_write is not None:
                slot, header_addr, header_rkey = header_write
                self._qp.post_write(self._tx_mr, slot * SLOT_BYTES, protocol.HEADER_SIZE, header_addr,
                                    header_rkey, wr_id=WRITE | ident, signaled=False,
                                    inline=protocol.HEADER_SIZE <= self._inline)
            offset = 0
            while offset < n:
                piece = min(WRITE_PIECE, n - offset)
                last = offset + piece == n
                self._qp.post_write(mr, offset, piece, addr + offset, rkey, wr_id=WRITE | ident,
                                    imm=imm if last else None, signaled=last)
                offset += piece

    # ---- teardown --------------------------------------------------------------------
    def close(self):
        """Destroy QP -> CQ -> MRs -> PD -> channel, then drop the device.  Only
        once no work request can complete into anything here (the caller sees to it)."""
        for obj in (self._qp, self.cq):
            if obj is not None:
                obj.close()
        if self.mr_cache is not None:
            self.mr_cache.close()
        for obj in (self._rx_mr, self._tx_mr, self._offer_mr, self._pd, self._channel):
            if obj is not None:
                obj.close()
        if self._have_device:
            self._have_device = False
            SharedDevice.release()
