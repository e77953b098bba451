"""The placed protocol, zero copy and one way: the receiver offers a buffer for
the peer's message of a tag (protocol.Tag: the next message of a stream, with
its sequence number), in an OFFER frame with the buffer's addr and rkey and
the entry of its offer-header table where the header goes; the sender
RDMA-writes the header into that entry and then the payload straight into the
buffer, the immediate = PLACED_BIT | offer id (RC places both writes before
the immediate completes); the receiver checks the header's tag and length
against its offer.  A new offer for the same stream replaces the last; with
none free, or none that fits, a message goes by rendezvous."""
from collections import deque, namedtuple

from rdmakv.core import protocol
from rdmakv.core.errors import ConnectionClosed, ProtocolError
from rdmakv.transport.verbs.frames import EAGER_LIMIT, K_OFFER, OFFER, OFFER_SLOTS, PLACED_BIT, PREFIX
from rdmakv.transport.verbs.mrcache import buffer_span

# A buffer of ours the peer may write its message of `tag` into.
_Offer = namedtuple("_Offer", "tag view pin")
# Where the peer wants our message of `sequence` in the stream it is filed under.
_PeerOffer = namedtuple("_PeerOffer", "sequence ident length addr rkey header_addr header_rkey")


class Offers:
    def __init__(self, state, resources, flow, sender):
        self._state = state
        self._resources = resources
        self._flow = flow
        self._sender = sender
        self._ours = {}                # offer id -> _Offer: buffers of ours the peer may write into
        self._our_ids = {}             # tag stream -> our newest offer id for it
        self._free_ids = deque(range(OFFER_SLOTS))   # FIFO, so a retired id is reused last
        self._theirs = {}              # tag stream -> _PeerOffer
        self.placed_bytes = 0          # payload bytes written straight into offered buffers (both ways)
        self.copied_bytes = 0          # placed payloads then copied to where the receiver wanted them

    # ---- offering our buffers ----------------------------------------------------------
    def offer(self, tag, buffer):
        """Register `buffer` for remote write and tell the peer to write its
        message of `tag` straight into it."""
        view = memoryview(buffer)
        if not view.contiguous or view.nbytes <= EAGER_LIMIT:
            return                    # small messages are cheaper through the eager slots
        view = view.cast("B")
        with self._state.cv:
            # Offers are advice: without one the message comes by rendezvous, where
            # a broken connection reports itself.
            if self._state.closed or self._state.error is not None or not self._free_ids:
                return
            ident = self._free_ids.popleft()
        try:
            pin = self._resources.mr_cache.pin(view, self._resources.remote_write)
        except BaseException:
            with self._state.cv:
                self._free_ids.append(ident)
            raise
        with self._state.cv:
            self._ours[ident] = _Offer(tag, view, pin)
            replaced = self._our_ids.get(tag.stream)
            self._our_ids[tag.stream] = ident
        if replaced is not None:
            self._retire(replaced)
        entry, table_rkey = self._resources.offer_header_entry(ident)
        body = OFFER.pack(tag.stream.to_bytes(protocol.TAG_STREAM_BYTES, "little"), tag.sequence, view.nbytes,
                          entry, table_rkey)
        self._sender.post_frame(K_OFFER, ident, body, rkey=pin[1].rkey, addr=pin[1].addr, what="offer to")

    def _retire(self, ident):
        """Forget our offer `ident` and unpin its buffer; returns it (or None)."""
        with self._state.cv:
            offer = self._ours.pop(ident, None)
            if offer is None:
                return None
            if self._our_ids.get(offer.tag.stream) == ident:
                del self._our_ids[offer.tag.stream]
            self._free_ids.append(ident)
        self._resources.mr_cache.unpin(offer.pin)
        return offer

    @property
    def open_offers(self):
        """How many of our offers the peer may still write into."""
        return len(self._ours)

    # ---- receiving into them -------------------------------------------------------------
    def placed_header(self, ident):
        """The header of a message the peer wrote into our offer `ident`, checked against the offer."""
        with self._state.cv:
            offer = self._ours.get(ident)
        peer = self._state.peer
        if offer is None:
            raise ProtocolError(f"{peer} wrote a message into offer {ident}, which is not open")
        header = protocol.unpack(self._resources.offer_header(ident))
        tag = protocol.tag_of(header)
        if tag != offer.tag or header.length != offer.view.nbytes:
            raise ProtocolError(f"{peer} wrote {tag} ({header.length} bytes) into the buffer offered for "
                                f"{offer.tag} ({offer.view.nbytes} bytes)")
        return header

    def placed_length(self, ident):
        """(cv held) The payload bytes already in place in our offer `ident`."""
        offer = self._ours.get(ident)
        return 0 if offer is None else offer.view.nbytes

    def receive(self, ident, length, destination):
        """The payload is in our offer `ident`'s buffer: retire the offer, and copy
        only if the caller changed its mind about where the payload goes."""
        offer = self._retire(ident)
        if offer is None:
            raise ConnectionClosed(f"receive from {self._state.peer}: connection closed")
        if buffer_span(destination) != buffer_span(offer.view):
            destination[:] = offer.view
            with self._state.cv:
                self.copied_bytes += length
        with self._state.cv:
            self.placed_bytes += length

    # ---- the peer's offers -----------------------------------------------------------------
    def take(self, frame, ident, rkey, addr):
        """Record the peer's offer in the OFFER `frame` (progress thread, cv held):
        at once, so a sender sees it whatever its reader is doing."""
        stream, sequence, length, header_addr, header_rkey = OFFER.unpack_from(frame, PREFIX.size)
        stream = int.from_bytes(stream, "little")
        peer = self._state.peer
        if length <= EAGER_LIMIT or ident >= OFFER_SLOTS:
            self._state.fail(ProtocolError(f"{peer} offered a buffer of {length} bytes as offer {ident}"))
        elif stream not in self._theirs and len(self._theirs) >= OFFER_SLOTS:
            self._state.fail(ProtocolError(f"{peer} offered more than {OFFER_SLOTS} buffers"))
        else:
            self._theirs[stream] = _PeerOffer(sequence, ident, length, addr, rkey, header_addr, header_rkey)

    def peer_offer(self, tag):
        """The peer's open offer for our next message of tag.stream, or None."""
        return self._theirs.get(tag.stream)

    def claim(self, tag, n):
        """(cv held) The peer's offer for our message of `tag` and n bytes, now
        used up, or None when there is none that fits."""
        offer = self._theirs.get(tag.stream)
        if offer is None or offer.sequence != tag.sequence or offer.length != n:
            return None
        del self._theirs[tag.stream]
        return offer

    def send(self, header, mr, n, ident, offer, deadline):
        """Write the header into the peer's table entry for the offer and the
        payload into the offered buffer; the immediate names the offer."""
        with self._state.cv:
            slot = self._flow.take_slot(True, "send to", deadline)
        self._resources.send_slot(slot)[:protocol.HEADER_SIZE] = header
        # On failure the slot stays taken: the NIC may still read it, and the connection is dead.
        self._sender.write(mr, n, offer.addr, offer.rkey, ident, PLACED_BIT | offer.ident, deadline,
                           header_write=(slot, offer.header_addr, offer.header_rkey))
        with self._state.cv:
            self._flow.slot_free(slot)
            self.placed_bytes += n
            self._state.cv.notify_all()
