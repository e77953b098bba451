"""One server on the native data path (rdmakv/native/worker_engine.c): the
engine's threads move the data; this side sends control messages through the
engine, hears its events, and decides what a failure means."""
from __future__ import annotations

import logging
import threading

from rdmakv.control.engine_errors import engine_read_error, engine_stream_error
from rdmakv.control.peer import closed_connection_warnings
from rdmakv.core import protocol
from rdmakv.core.errors import ClosedError, ConnectionClosed, EndOfStream, PeerTimeout, ProtocolError
from rdmakv.core.protocol import Op
from rdmakv.native import transport as _t
from rdmakv.worker.links import ServerLinkBase

log = logging.getLogger("rdmakv.worker")


class EngineLink(ServerLinkBase):
    """One server on the native data path (rdmakv/native/worker_engine.c): the engine's
    threads send our pushes and take the results in; this side hears the rest
    (the engine's events) and decides what a failure means."""

    def __init__(self, store, rank, address):
        super().__init__(store, rank, address)
        self.connection = None
        self.missing = {}             # (wire key, chunk) -> (round, workers the server said it waits for)
        self._lock = threading.Lock()

    def start(self, connection):
        self.connection = connection
        self.store.engine.start_link(self.rank, *connection.engine_stream(), registrations=connection.registrations)
        self.send_json(Op.CONNECT, {"rank": self.store.rank})

    @property
    def connected(self):
        return self.connection is not None

    def wire_bytes(self):
        """(bytes sent, bytes received) on this link: the engine's stream, and what
        the connection moved itself before the engine took it."""
        engine_sent, engine_received = self.store.engine.wire_bytes(self.rank)
        sent, received = self.connection.wire_bytes()
        return sent + engine_sent, received + engine_received

    @property
    def summed_bytes(self):
        """Push bytes added straight into the server's shared sums (shared memory)."""
        return self.store.engine.summed_bytes(self.rank)

    def send(self, op, payload=None, **fields):
        if isinstance(self.error, ClosedError):
            raise ConnectionClosed(f"send to {self.connection.peer}: connection already closed")
        length = 0 if payload is None else memoryview(payload).nbytes
        code, err = self.store.engine.send(self.rank, protocol.pack(op, length=length, **fields), payload)
        if code:
            raise engine_stream_error(code, err, "send to", self.connection.peer, self.store.config.timeout)

    def note_missing(self, header, missing):
        with self._lock:
            self.missing[(header.key, header.chunk)] = (header.round, missing)

    def owed(self, handle):
        """[(chunk index, the workers the server said it waits for, or None)] still owed for handle."""
        indices, _ = handle.owed_by(self.rank)
        wire = handle.info.wire
        with self._lock:
            told = [self.missing.get((wire, index)) for index in indices]
        return [(index, entry[1] if entry is not None and entry[0] == handle.round else None)
                for index, entry in zip(indices, told)]

    def on_event(self, event):
        """An event of this link's engine threads (the engine's event thread)."""
        _, kind, code, err, limit, fields, payload = event
        peer, timeout = self.connection.peer, self.store.config.timeout
        if kind == _t.EVENT_MESSAGE:
            try:
                self.on_control(protocol.Header(*fields[2:]), payload)
            except ProtocolError as exc:
                self._broken(exc)
        elif code == _t.ERR_HOST_STALLED and self.store.host_sums is not None:
            self.fail(PeerTimeout(f"pushpull with {self.describe()}: {self.store.host_sums.describe_stall()}"))
            self.connection.shut()
        elif kind == _t.EVENT_SEND_FAILED:
            error = engine_stream_error(code, err, "send to", peer, timeout)
            self.fail(ConnectionClosed(f"sending to {self.describe()} failed: {error}"))
        else:
            self._broken(engine_read_error(code, err, limit, fields, self.describe(), peer, timeout))

    def _broken(self, error):
        """The connection cannot go on: say why (as a Peer's reader does) and fail what waits on it."""
        if isinstance(error, EndOfStream):
            log.debug("%s closed the connection", self.describe())
        elif self.error is None:
            closed_connection_warnings.warn(log, "connections closed with errors",
                                            "connection to server %d (%s) closed: %s",
                                            self.rank, self.connection.peer, error)
        self.fail(ConnectionClosed(f"connection to {self.describe()} lost: {error}"))
        self.connection.shut()        # stops the engine's reader, if the error was not its own

    def fail(self, error):
        """Fail every operation that waits on this server; later calls fail at once."""
        with self._lock:
            if self.error is None:
                self.error = error
        self.store.engine.fail_link(self.rank, _t.OUTCOME_LINK_FAILED)
        with self.replied:
            self.replied.notify_all()

    def close(self):
        self.fail(ClosedError("the KVStore is closed"))
