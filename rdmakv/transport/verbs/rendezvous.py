"""The rendezvous protocol, zero copy, for a large payload the peer offered no
buffer for: the header goes alone; the receiver registers its destination and
answers clear-to-send {id, addr, rkey}; the sender RDMA-writes straight from
the caller's array with the immediate = id, which completes the receiver's wait."""
from rdmakv.core.errors import ProtocolError
from rdmakv.transport.verbs.frames import EAGER_LIMIT, K_CTS, K_RNDV


class Rendezvous:
    def __init__(self, state, resources, sender):
        self._state = state
        self._resources = resources
        self._sender = sender
        self._clear_to_send = {}       # message id -> (addr, rkey) from the peer
        self._arrived = set()          # ids whose write-with-imm arrived here
        self.moved_bytes = 0           # payload bytes moved this way (both ways)

    # ---- the progress thread tells (cv held) ------------------------------------------
    def cleared(self, ident, addr, rkey):
        """The peer's clear-to-send for our message `ident`."""
        self._clear_to_send[ident] = (addr, rkey)

    def written(self, ident):
        """The peer's write of message `ident` into our destination completed."""
        self._arrived.add(ident)

    # ---- sending -------------------------------------------------------------------------
    def send(self, header, mr, n, ident, deadline):
        """Send the header alone, wait for clear-to-send, then write the payload there."""
        self._sender.post_frame(K_RNDV, ident, header)
        with self._state.cv:
            self._state.wait(lambda: ident in self._clear_to_send, "clear-to-send from", deadline)
            addr, rkey = self._clear_to_send.pop(ident)
        self._sender.write(mr, n, addr, rkey, ident, ident, deadline)
        with self._state.cv:
            self.moved_bytes += n

    # ---- receiving -----------------------------------------------------------------------
    def check(self, header, carried):
        """A rendezvous frame carries no payload, and only one too large for the eager slots."""
        if carried or header.length <= EAGER_LIMIT:
            raise ProtocolError(f"{self._state.peer}: a rendezvous for {header.length} bytes is not allowed")

    def receive(self, ident, length, destination):
        """Tell the peer where message `ident`'s payload goes and wait until it is there."""
        with self._resources.mr_cache.lease(destination, self._resources.remote_write) as mr:
            self._sender.post_frame(K_CTS, ident, rkey=mr.rkey, addr=mr.addr, uses_credit=False,
                                    what="clear-to-send to")
            with self._state.cv:
                self._state.wait(lambda: ident in self._arrived, "receive from")
                self._arrived.discard(ident)
                self.moved_bytes += length
