"""Setting verbs connections up: the listener, which never waits on a peer,
and the connector's side (connect)."""
import logging
import socket
import time

from rdmakv.core import netif
from rdmakv.core.errors import ConnectionClosed, ProtocolError, TransportError
from rdmakv.transport import tcp as _tcp
from rdmakv.transport.base import Listener as _ListenerBase, Throttle
from rdmakv.transport.verbs import devices as verbs_devices
from rdmakv.transport.verbs.connection import VerbsConnection
from rdmakv.transport.verbs.handshake import (BLOB_HEAD, MAX_BLOB_BYTES, blob_length, decode_blob, frame_blob,
                                              recv_blob, recv_exact)
from rdmakv.transport.verbs.stream import VerbsStreamConnection

log = logging.getLogger("rdmakv.transport.verbs")

SETUP_SECONDS = 5.0            # a connector sends its endpoint at once: one that has not by then is refused
MAX_SETUPS = 64                # set-ups in progress at a listener (beyond: refused at once) ...
MAX_SETUPS_PER_SOURCE = 32     # ... and from one address


class _SetUp:
    """An accepted socket whose verbs set-up is in progress: first the peer's
    endpoint is read (nothing is allocated before it is whole and well formed),
    then, with our QP connected and our endpoint and ready byte sent, its ready byte."""

    def __init__(self, sock, source, name, deadline):
        self.sock = sock
        self.source = source
        self.name = name
        self.deadline = deadline
        self.received = bytearray()    # of the peer's set-up message
        self.connection = None         # once that message is in: ours, waiting for the peer's ready byte


class VerbsListener(_ListenerBase):
    """A TCP listener whose accepted sockets become verbs connections.  accept()
    never waits on a peer: set-ups advance as their bytes arrive, each within
    SETUP_SECONDS and within caps per source address and in total; refusals are
    logged within a budget."""

    def __init__(self, host, port, timeout, backlog=128):
        verbs_devices.select_port()      # fail now, with the reason, where verbs can't work
        self._sock, self.address = _tcp.listen_socket(host, port, backlog)
        self._sock.setblocking(False)
        self._timeout = timeout
        self._setups = []                # _SetUps in progress, oldest first
        self._refusals = Throttle()

    def watch(self):
        fds = [self._sock.fileno()] + [setup.sock.fileno() for setup in self._setups]
        return fds, self._setups[0].deadline if self._setups else None

    def accept(self, timeout):
        return self.wait_ready(timeout, self._accept_ready)

    def _accept_ready(self):
        """A connection whose set-up is complete, or None; never waits."""
        for _ in range(MAX_SETUPS):          # then give the set-ups in progress a turn
            try:
                sock, address = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                break
            self._admit(sock, address)
        return self.advance_setups(self._setups, self._expire, self._advance)

    def _expire(self, setup):
        step = "ready byte" if setup.connection is not None else "verbs set-up message"
        self._refuse(setup, f"sent no {step} within {min(SETUP_SECONDS, self._timeout):g} s")

    def _admit(self, sock, address):
        """Start the set-up of a new connection, or refuse it at once."""
        setup = _SetUp(sock, address[0], netif.format_address(*address[:2]),
                       time.monotonic() + min(SETUP_SECONDS, self._timeout))
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            self._refuse(setup, str(exc))
            return
        if len(self._setups) >= MAX_SETUPS:
            self._refuse(setup, f"{MAX_SETUPS} verbs set-ups are already in progress")
        elif sum(other.source == setup.source for other in self._setups) >= MAX_SETUPS_PER_SOURCE:
            self._refuse(setup, f"{MAX_SETUPS_PER_SOURCE} verbs set-ups from {setup.source} are already "
                                f"in progress")
        else:
            self._setups.append(setup)

    def _refuse(self, setup, reason):
        self._refusals.warn(log, "verbs connections refused", "refused a verbs connection from %s: %s",
                            setup.name, reason)
        if setup.connection is not None:
            setup.connection.release()     # closes the socket too
            return
        try:                                # tell a real connector why, if its socket takes it now
            setup.sock.send(frame_blob({"error": reason}), socket.MSG_DONTWAIT)
            # Unread bytes would make close() reset the connection, and the connector lose the reason.
            setup.sock.recv(BLOB_HEAD + MAX_BLOB_BYTES, socket.MSG_DONTWAIT)
        except OSError:
            pass
        setup.sock.close()

    def _advance(self, setup):
        """The acceptor's side of one set-up: a connection once it is complete,
        False while it is not, None (after refusing it) if it fails."""
        what = f"verbs set-up with {setup.name}"
        try:
            if setup.connection is None:
                theirs = self._take_endpoint(setup, what)
                if theirs is None:
                    return False
                # The kind the connector asked for: a server that runs its engine refuses a
                # Python-path one when it names itself (server.py), with the setting to change.
                kind = VerbsStreamConnection if "ring" in theirs else VerbsConnection
                setup.connection = kind(setup.sock, self._timeout)
                setup.connection.connect_qp(theirs, what)
                mine = frame_blob(setup.connection.endpoint) + b"R"
                if setup.sock.send(mine, socket.MSG_DONTWAIT) != len(mine):   # a fresh socket takes it whole
                    raise ConnectionClosed(f"{what}: the peer does not read")
            ready = setup.sock.recv(1, socket.MSG_DONTWAIT)
            if not ready:
                raise ConnectionClosed(f"{what}: the peer closed the connection")
            if ready != b"R":
                raise ProtocolError(f"{what}: bad ready byte")
            setup.connection.mark_ready()
            return setup.connection
        except (BlockingIOError, InterruptedError):
            return False
        except (TransportError, ProtocolError, OSError, ValueError, OverflowError, TypeError) as exc:
            self._refuse(setup, str(exc))      # a value the verbs calls cannot take, too
            return None

    @staticmethod
    def _take_endpoint(setup, what):
        """The peer's endpoint once its set-up message is whole, None until then."""
        while True:
            want = BLOB_HEAD
            if len(setup.received) >= BLOB_HEAD:
                want += blob_length(setup.received, what)
            if len(setup.received) == want:
                return decode_blob(setup.received[BLOB_HEAD:], what)
            chunk = setup.sock.recv(want - len(setup.received), socket.MSG_DONTWAIT)  # BlockingIOError: later
            if not chunk:
                raise ConnectionClosed(f"{what}: the peer closed the connection")
            setup.received += chunk

    def close(self):
        for setup in self._setups:
            if setup.connection is not None:
                setup.connection.release()     # its verbs objects, and the socket
            else:
                setup.sock.close()
        self._setups = []
        self._sock.close()


def connect(host, port, timeout, retry_until=None, native=False):
    """Connect (retrying refused attempts until `retry_until`) and set up the QP:
    a stream a native engine runs (native), else the Python data path's connection."""
    sock = _tcp.connect_socket(host, port, timeout, retry_until)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        connection = (VerbsStreamConnection if native else VerbsConnection)(sock, timeout)
    except BaseException:
        sock.close()
        raise
    what = f"verbs set-up with {connection.peer}"
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(frame_blob(connection.endpoint))
        connection.connect_qp(recv_blob(sock, deadline, what), what)
        sock.sendall(b"R")
        if recv_exact(sock, 1, deadline, what) != b"R":
            raise ProtocolError(f"{what}: bad ready byte")
        connection.mark_ready()
        connection.start_progress()
    except BaseException:
        connection.release()
        raise
    return connection
