"""The eager protocol: a payload of at most EAGER_LIMIT bytes travels with its
header in one SEND, copied into a send slot here and out of the receive slot
there."""
from rdmakv.core import protocol
from rdmakv.core.errors import ProtocolError
from rdmakv.transport.verbs.frames import K_EAGER, PREFIX


class Eager:
    def __init__(self, state, resources, sender):
        self._state = state
        self._resources = resources
        self._sender = sender
        self.copied_bytes = 0          # payload bytes copied through slots (both ways)

    def send(self, header, payload, n):
        self._sender.post_frame(K_EAGER, 0, header, payload, n)
        with self._state.cv:
            self.copied_bytes += n

    def check(self, header, carried):
        """A frame must carry the whole payload its header announces."""
        if carried != header.length:
            raise ProtocolError(f"{self._state.peer}: header says {header.length} payload bytes, "
                                f"frame carries {carried}")

    def receive(self, slot, length, destination):
        """Copy the payload out of receive slot `slot` (the caller gives the slot back)."""
        start = PREFIX.size + protocol.HEADER_SIZE
        destination[:] = self._resources.receive_slot(slot)[start:start + length]
        with self._state.cv:
            self.copied_bytes += length
