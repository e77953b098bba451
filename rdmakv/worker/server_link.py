"""One server on the Python data path: the chunks queued for it by priority
under a byte credit, its sender thread, and the results it owes us."""
from __future__ import annotations

import threading

from rdmakv.control.peer import Handler, Peer
from rdmakv.core import protocol
from rdmakv.core.chunk_queue import ChunkQueue
from rdmakv.core.errors import ClosedError, ConnectionClosed, ProtocolError, RdmaKVError
from rdmakv.core.protocol import FLAG_ACK, FLAG_NO_DATA, Op
from rdmakv.server import summing
from rdmakv.worker.links import DIRECT_SEND_BYTES, ServerLinkBase


class ServerLink(ServerLinkBase, Handler):
    """One server on the Python data path: its connection, its send queue and
    sender thread, and the results it owes us, keyed by (wire key, chunk, round)."""

    def __init__(self, store, rank, address):
        super().__init__(store, rank, address)
        self.peer = None
        self.queue = ChunkQueue(store.config.scheduling_credit * store.config.partition_bytes)
        self.ready = threading.Condition()
        self.expected = {}
        self.sending = False          # a thread is sending: only one takes from the queue at a time
        self.summed_bytes = 0         # push bytes added straight into the server's shared sums (shared memory)
        # (wire key, chunk) -> 1 + the last round whose result arrived: a push is added into a
        # shared sum only as the round after it (summing.py: the buffer it reuses was copied
        # out by every worker only then; a cancelled round breaks the chain).
        self.rounds_done = {}
        self.sender = threading.Thread(target=self._send_loop, daemon=True, name=f"rdmakv-send-{rank}")

    def start(self, connection):
        self.peer = Peer(connection, self, f"server {self.rank}").start()
        self.peer.send_json(Op.CONNECT, {"rank": self.store.rank})
        self.sender.start()

    @property
    def connected(self):
        return self.peer is not None

    @property
    def connection(self):
        return self.peer.connection

    def send(self, op, payload=None, **fields):
        self.peer.send(op, payload, **fields)

    def wire_bytes(self):
        """(bytes sent, bytes received) on this link."""
        return self.connection.wire_bytes()

    def owed(self, handle):
        """[(chunk index, the workers the server said it waits for, or None)] still owed for handle."""
        with self.ready:
            return [(slot[1], entry[4]) for slot, entry in self.expected.items() if entry[0] is handle]

    def note_missing(self, header, missing):
        with self.ready:
            entry = self.expected.get((header.key, header.chunk, header.round))
            if entry is not None:
                entry[4] = missing

    def enqueue(self, handle, chunk, source, destination):
        if self._pulled(handle, chunk.index) is None:
            # Before the push: the result can then be written straight into destination (verbs).
            self.peer.offer(protocol.tag(Op.RESULT, handle.info.wire, chunk.index, handle.round), destination)
        with self.ready:
            if self.error is not None:
                raise self.error
            slot = (handle.info.wire, chunk.index, handle.round)
            # handle, destination, bytes, holds credit, the workers the server said it still waits for
            self.expected[slot] = [handle, destination, chunk.nbytes, False, None]
            # Credit counts bytes sent and not yet in the server's hands (it answers
            # RECEIVED), never bytes waiting for the round's sum: that needs the
            # other workers' chunks, and workers whose credit went to different
            # chunks would wait for each other forever.  Small chunks take none.
            credit = chunk.nbytes if chunk.nbytes > DIRECT_SEND_BYTES and self.queue.credit else 0
            self.queue.push((handle, chunk, source, slot), priority=handle.priority,
                            key_order=handle.info.order, chunk=chunk.index, nbytes=credit)
            # A small chunk with nothing ahead of it is sent by the calling thread:
            # no hand-off to the sender thread, which costs more than the send.
            item = None
            if not self.sending and len(self.queue) == 1 and chunk.nbytes <= DIRECT_SEND_BYTES:
                item = self._take()
            if item is None:
                self.ready.notify()
                return
            self.sending = True
        self._transmit(item)

    def _take(self):
        """The next chunk to send (caller holds self.ready), or None if none may go now."""
        while (popped := self.queue.pop()) is not None:
            (handle, chunk, source, slot), nbytes = popped
            entry = self.expected.get(slot)
            if entry is not None and not handle.settled:
                if nbytes:
                    entry[3] = True   # holds credit until RECEIVED (or the result) comes back
                else:
                    self.queue.finish(0)
                return handle, chunk, source, entry[3]
            self.queue.finish(nbytes)
        return None

    def _transmit(self, item):
        handle, chunk, source, credited = item
        info = handle.info
        payload = None if handle.flags & FLAG_NO_DATA else source
        flags = handle.flags | (FLAG_ACK if credited else 0)
        try:
            if info.encoders is not None and not handle.flags:   # a broadcast's value goes whole
                payload = info.encoders[chunk.index].encode(payload)
                in_place = False
            else:
                in_place = self._sum_in_place(info, chunk, handle.round, flags, payload)
            if self.store.tracer:         # as it leaves: its result may be in before send() returns
                self.store.tracer.stage("sent", key=info.name, chunk=chunk.index, round=handle.round,
                                        priority=handle.priority)
            self.peer.send(Op.PUSH, payload, in_place, dtype=info.dtype_code, flags=flags, key=info.wire,
                           chunk=chunk.index, priority=handle.priority, round=handle.round,
                           sender=self.store.rank)
        except RdmaKVError as exc:
            self.fail(ConnectionClosed(f"sending to {self.describe()} failed: {exc}"))
        finally:
            with self.ready:
                self.sending = False
                if self.queue:        # waking an idle sender thread would only cost a GIL hand-off
                    self.ready.notify()

    def _sum_in_place(self, info, chunk, rnd, flags, payload):
        """Whether the push was added straight into the server's shared sum (summing.py)."""
        if (payload is None or not self.peer.connection.features.shares
                or self.rounds_done.get((info.wire, chunk.index), 0) != rnd):
            return False
        added = summing.push_in_place(self.peer.connection, protocol.tag(Op.PUSH, info.wire, chunk.index, rnd),
                                      info.dtype_code, flags, payload, self.store.config.timeout)
        self.summed_bytes += added
        return bool(added)

    def _send_loop(self):
        while True:
            with self.ready:
                while True:
                    if self.error is not None:
                        return
                    if not self.sending and (item := self._take()) is not None:
                        self.sending = True
                        break
                    self.ready.wait()
            self._transmit(item)

    # reader-thread callbacks
    def destination(self, peer, header):
        if header.op != Op.RESULT:
            if header.op == Op.STATES:
                return bytearray(header.length)   # optimizer state: sized by what we asked for
            return None
        with self.ready:
            entry = self.expected.get((header.key, header.chunk, header.round))
        if entry is None and (self.store.key_refused(header.key) or self.error is not None):
            # A result that crossed its key's failure, or this link's (the job failed and
            # what was owed was let go): taken in and dropped, no more than a chunk of the key.
            limit = self.store.largest_chunk(header.key)
            if limit is not None and header.length <= limit:
                return bytearray(header.length)
        if entry is None:
            raise ProtocolError(f"{self.describe()} sent an unexpected result for key {header.key} "
                                f"chunk {header.chunk} round {header.round}")
        encoder = self._pulled(entry[0], header.chunk)
        if encoder is not None:
            # An encoded sum: taken in here, decoded into the destination by on_message.
            if header.length > encoder.max_bytes:
                raise ProtocolError(f"{self.describe()} sent a result of {header.length} bytes for key "
                                    f"{entry[0].info.name!r} chunk {header.chunk}; its encoding takes at most "
                                    f"{encoder.max_bytes}")
            return memoryview(encoder.pulled)[:header.length]
        return entry[1]

    @staticmethod
    def _pulled(handle, index):
        """The chunk's encoder when this round's result comes encoded (ChunkEncoder), else None."""
        encoders = handle.info.encoders
        if encoders is None or handle.flags or encoders[index].pulled is None:
            return None
        return encoders[index]

    def on_message(self, peer, header, payload):
        if header.op == Op.RESULT:
            with self.ready:
                entry = self.expected.pop((header.key, header.chunk, header.round), None)
                if entry is not None:
                    self._return_credit(entry)
                    self.rounds_done[(header.key, header.chunk)] = header.round + 1
            encoder = None if entry is None else self._pulled(entry[0], header.chunk)
            if encoder is not None:
                entry[1][:] = 0
                try:
                    encoder.codec.decode_add(entry[1], b"" if payload is None else payload)
                except ValueError as exc:
                    error = ProtocolError(f"{self.describe()} sent a result of key {entry[0].info.name!r} chunk "
                                          f"{header.chunk} that is no encoding of it: {exc}")
                    entry[0].finish(error)
                    raise error from None
            if entry is not None:
                if self.store.tracer:
                    self.store.tracer.stage("received", key=entry[0].info.name, chunk=header.chunk,
                                            round=header.round)
                entry[0].chunk_done()
        elif header.op == Op.RECEIVED:
            with self.ready:
                entry = self.expected.get((header.key, header.chunk, header.round))
                if entry is not None:
                    self._return_credit(entry)
        else:
            self.on_control(header, payload)

    def on_closed(self, peer, error):
        self.fail(ConnectionClosed(f"connection to {self.describe()} lost: {error or 'closed'}"))

    def fail(self, error):
        """Fail every operation that waits on this server; later calls fail at once."""
        with self.ready:
            if self.error is None:
                self.error = error
            entries = list(self.expected.values())
            self.expected.clear()
            self.queue.drain()
            self.ready.notify_all()
        with self.replied:
            self.replied.notify_all()
        for entry in entries:
            entry[0].finish(self.error)

    def drop_key(self, wire):
        """Forget the results owed for a failed key, returning their credit."""
        with self.ready:
            for slot in [s for s in self.expected if s[0] == wire]:
                self._return_credit(self.expected.pop(slot))

    def _return_credit(self, entry):
        """The caller holds self.ready."""
        if entry[3]:
            entry[3] = False
            self.queue.finish(entry[2])
            self.ready.notify()

    def close(self):
        self.fail(ClosedError("the KVStore is closed"))
        if self.peer is not None:
            self.peer.close()
        if self.sender.is_alive():
            self.sender.join(5)
