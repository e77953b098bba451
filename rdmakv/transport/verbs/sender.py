"""What leaves one side of a verbs connection: frames copied into send slots
and SENT (each protocol's messages, clear-to-send, offers, returned credits),
and RDMA writes straight from the caller's memory, each awaited until its
completion."""
from rdmakv.core.errors import ConnectionClosed, VerbsError
from rdmakv.transport.verbs.frames import K_CREDIT, PLACED_BIT, PREFIX


class Sender:
    def __init__(self, state, resources, flow):
        self._state = state
        self._resources = resources
        self._flow = flow
        self._writes_done = {}         # message id -> None or the error, our writes' completions
        self._next_id = 1

    def new_message_id(self):
        """An id for a large message (cv held): it names the message's RDMA write
        and, by rendezvous, the message; never 0, always below PLACED_BIT."""
        ident = self._next_id
        self._next_id = self._next_id % (PLACED_BIT - 1) + 1
        return ident

    def post_frame(self, kind, ident, header=b"", payload=None, n=0, rkey=0, addr=0, uses_credit=True,
                   what="send to", block=True):
        """Copy one frame (prefix, header, n payload bytes) into a send slot and SEND
        it, the credits owed to the peer riding in its prefix.  Waits for a slot (and
        a credit if uses_credit); with block=False, sends nothing rather than wait."""
        with self._state.cv:
            if not block and not self._flow.has_free_slot():
                return
            slot = self._flow.take_slot(uses_credit, what)
            credits = self._flow.take_owed()
        frame = self._resources.send_slot(slot)
        PREFIX.pack_into(frame, 0, kind, 0, credits, ident, rkey, addr)
        end = PREFIX.size
        if header:
            frame[end:end + len(header)] = header
            end += len(header)
        if n:
            frame[end:end + n] = payload
            end += n
        try:
            self._resources.post_send(slot, end)
        except (VerbsError, ValueError) as exc:
            self._state.fail(ConnectionClosed(f"{what} {self._state.peer}: {exc}"))
            with self._state.cv:
                self._state.check(what)
            raise

    def return_credits(self, block):
        """Return owed credits in a CREDIT frame once a batch is owed.  The progress
        thread passes block=False: it must never wait for a send slot."""
        with self._state.cv:
            if not self._flow.owes_a_batch() or self._state.error is not None or self._state.closed:
                return
        self.post_frame(K_CREDIT, 0, uses_credit=False, what="credit to", block=block)

    def write(self, mr, n, addr, rkey, ident, imm, deadline, header_write=None):
        """RDMA-write mr's n bytes to (addr, rkey), the last piece with `imm`, and
        wait for completion (header_write: see ConnectionResources.post_write)."""
        try:
            self._resources.post_write(mr, n, addr, rkey, ident, imm, header_write)
        except (VerbsError, ValueError) as exc:
            self._state.fail(ConnectionClosed(f"RDMA write to {self._state.peer}: {exc}"))
            raise self._state.error from None
        with self._state.cv:
            try:
                self._state.wait(lambda: ident in self._writes_done, "RDMA write to", deadline)
            finally:
                error = self._writes_done.pop(ident, None)
            if error is not None:
                raise error

    def write_completed(self, ident, error):
        """The progress thread (cv held): our write `ident` completed, or failed with `error`."""
        self._writes_done[ident] = error
