"""Joining a cluster: every worker and server connects to the scheduler,
says HELLO, and receives its rank and the address book in WELCOME."""
import errno
import functools
import logging
import math
import select
import socket
import threading
import time

from rdmakv.control import auth
from rdmakv.control.auth import AuthenticationError
from rdmakv.control.peer import Handler, Peer
from rdmakv.core import netif, protocol
from rdmakv.core.errors import EndOfStream, PeerTimeout, ProtocolError, RdmaKVError, RemoteError
from rdmakv.core.protocol import Op
from rdmakv.transport.base import Throttle

log = logging.getLogger("rdmakv.node")


UNAUTHENTICATED_MAX = 256         # connections not yet handed to a reader thread, in total ...
UNAUTHENTICATED_PER_SOURCE = 64   # ... and from one address or local uid (a host's workers join at once)
HANDSHAKE_SECONDS = 5.0           # to answer the challenge (a real peer answers at once)
GATE_TICK = 0.01                  # how often connections whose arrivals wake no descriptor are looked at
INCOMPLETE_TICK = 0.05            # ... and those that sent part of a message (real peers send it whole)
HANG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR
ACCEPT_BACKOFF = (0.01, 1.0)      # after a failed accept (EMFILE...): first and longest pause


def accept_peers(listener, handler, secret, timeout, running, label, silence_limit=None, integrity=False):
    """Accept connections while running() is true; each becomes a Peer once it has
    authenticated and sent its first message (see Gate); with silence_limit, a Peer
    that heartbeats and is dropped once it has been silent that long (see Peer)."""
    Gate(listener, handler, secret, timeout, label, silence_limit, integrity).run(running)


class _Admission:
    """A connection on its way in: authenticating, then waiting for its first message."""

    def __init__(self, connection, challenge, deadline):
        self.connection = connection
        self.challenge = challenge    # None once authenticated
        self.deadline = deadline
        self.incomplete = False       # part of a message is there, the rest is not


class Gate:
    """One thread that accepts connections and takes each through the
    authentication handshake and up to its first message, without ever waiting
    on one of them: until then a connection costs a descriptor, not a thread.
    Each has its own deadline (HANDSHAKE_SECONDS to authenticate, the timeout
    to send its first message); connections in that state are capped per
    source and in total, refusals are logged within a budget, and a failing
    accept() (out of descriptors) pauses and retries instead of ending the loop."""

    def __init__(self, listener, handler, secret, timeout, label, silence_limit=None, integrity=False):
        self.listener = listener
        self.handler = handler
        self.secret = secret
        self.timeout = timeout
        self.label = label
        self.silence_limit = silence_limit
        self.integrity = integrity
        self._admissions = []
        self._per_source = {}
        self._backoff = 0.0
        self._paused_until = 0.0
        self._refusals = Throttle()
        self._accept_errors = Throttle(burst=3)

    def run(self, running):
        try:
            while running() and self._turn(running):
                pass
        finally:
            for admission in list(self._admissions):
                self._drop(admission)

    def _turn(self, running):
        now = time.monotonic()
        listening = now >= self._paused_until
        fds, wake = self.listener.watch() if listening else ([], self._paused_until)
        wake = min(wake or math.inf, now + 1.0)
        poller = select.poll()
        for fd in fds:
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        for admission in self._admissions:
            wake = min(wake, admission.deadline)
            fd = admission.connection.fileno()
            if fd < 0:
                wake = min(wake, now + GATE_TICK)
            elif admission.incomplete:     # POLLIN would stay up: watch for a hang-up, look again soon
                wake = min(wake, now + INCOMPLETE_TICK)
                poller.register(fd, select.POLLRDHUP)
            else:
                poller.register(fd, select.POLLIN | select.POLLRDHUP)
        ready = dict(poller.poll(max(0, math.ceil((wake - now) * 1000))))
        if not running():
            return False
        if listening and not self._accept_some():
            return False
        now = time.monotonic()
        for admission in list(self._admissions):
            fd = admission.connection.fileno()
            if fd < 0 or fd in ready or admission.incomplete or admission.deadline <= now:
                self._advance(admission, now, ready.get(fd, 0) & HANG_UP)
        return True

    def _accept_some(self):
        """Take what the listener has; False if it cannot accept any more, ever."""
        for _ in range(UNAUTHENTICATED_MAX):   # then see to the connections already in
            try:
                connection = self.listener.accept(0)
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    log.error("stopped accepting connections at %s: %s",
                              netif.format_address(*self.listener.address), exc)
                    return False
                self._backoff = min(ACCEPT_BACKOFF[1], max(ACCEPT_BACKOFF[0], 2 * self._backoff))
                self._paused_until = time.monotonic() + self._backoff
                self._accept_errors.warn(log, "failed accepts", "cannot accept connections at %s: %s; "
                                         "retrying in %.2f s", netif.format_address(*self.listener.address),
                                         exc, self._backoff)
                return True
            self._backoff = 0.0
            if connection is None:
                return True
            self._admit(connection)
        return True

    def _admit(self, connection):
        # At a cap, the oldest waiting connection gives way rather than the newcomer: a real
        # node's handshake takes milliseconds, so idle squatters (even from the same address
        # as the real nodes, e.g. 127.0.0.1 on one host) are what gets dropped, and a node
        # that is dropped anyway is told it may retry (auth.BUSY).
        source = connection.source
        if self._per_source.get(source, 0) >= UNAUTHENTICATED_PER_SOURCE:
            self._evict(source, f"too many connections authenticating from {source} "
                                f"({UNAUTHENTICATED_PER_SOURCE})")
        elif len(self._admissions) >= UNAUTHENTICATED_MAX:
            busiest = max(self._per_source, key=self._per_source.get)
            self._evict(busiest, f"{UNAUTHENTICATED_MAX} connections are authenticating")
        try:
            if connection.readable_bytes() is None:   # a transport that cannot say: the handshake in a thread
                self._start_peer(connection, functools.partial(auth.accept, secret=self.secret,
                                                               timeout=self.timeout, integrity=self.integrity))
                return
            challenge = auth.Challenge(connection, self.secret, self.integrity)
        except RdmaKVError as exc:
            log.debug("connection from %s failed before the handshake: %s", connection.peer, exc)
            connection.close()
            return
        self._admissions.append(_Admission(connection, challenge,
                                           time.monotonic() + min(HANDSHAKE_SECONDS, self.timeout)))
        self._per_source[source] = self._per_source.get(source, 0) + 1

    def _advance(self, admission, now, hung_up):
        connection = admission.connection
        try:
            if admission.challenge is not None:
                if admission.challenge.step():
                    admission.challenge = None
                    admission.deadline = now + self.timeout
                elif admission.deadline <= now:
                    error = AuthenticationError(f"{connection.peer} did not answer the authentication challenge "
                                                f"within {min(HANDSHAKE_SECONDS, self.timeout):g} s")
                    admission.challenge.refuse(error)
                    raise error
            if admission.challenge is None:
                if connection.readable_bytes() >= protocol.HEADER_SIZE:
                    self._drop(admission, close=False)
                    self._start_peer(connection, None)
                    return
                if admission.deadline <= now:
                    raise PeerTimeout(f"{connection.peer} sent nothing within {self.timeout:g} s of "
                                      f"authenticating (RDMAKV_TIMEOUT)")
            if hung_up:                      # what it sent is all it will ever send
                raise EndOfStream(f"{connection.peer} left during the handshake")
            admission.incomplete = connection.readable_bytes() > 0
        except EndOfStream:
            self._drop(admission)
        except RdmaKVError as exc:
            self._refusals.warn(log, "connections refused", "refused %s at %s: %s", self.label,
                                connection.peer, exc)
            self._drop(admission)

    def _start_peer(self, connection, handshake):
        peer = Peer(connection, self.handler, f"{self.label} at {connection.peer}", handshake,
                    introduce_within=self.timeout, silence_limit=self.silence_limit)
        try:
            peer.start()
        except RuntimeError as exc:             # no thread to be had
            self._refusals.warn(log, "connections refused", "refused %s at %s: %s", self.label,
                                connection.peer, exc)
            connection.close()

    def _evict(self, source, reason):
        """Drop the longest-waiting connection from source, telling it it may retry."""
        oldest = next(admission for admission in self._admissions if admission.connection.source == source)
        self._refuse(oldest.connection, reason, busy=True, dropped=oldest)

    def _refuse(self, connection, reason, busy=False, dropped=None):
        self._refusals.warn(log, "connections refused", "refused %s at %s: %s", self.label, connection.peer, reason)
        if dropped is not None:
            self._drop(dropped, close=False)
        body = protocol.encode_json({"message": reason, auth.BUSY: busy})
        try:
            connection.send(protocol.pack(Op.ERROR, length=len(body)), body)
        except RdmaKVError:
            pass
        connection.close()

    def _drop(self, admission, close=True):
        self._admissions.remove(admission)
        source = admission.connection.source
        self._per_source[source] -= 1
        if not self._per_source[source]:
            del self._per_source[source]
        if close:
            admission.connection.close()


class ControlLink(Handler):
    """A node's connection to the scheduler.  After WELCOME, every control
    message goes to on_control(header, obj) and a lost link to on_lost(error)."""

    def __init__(self, config, transport, role, on_control, on_lost):
        from rdmakv.transport import tcp
        self.config = config
        self.transport = tcp            # the scheduler always speaks TCP; `transport` is for data
        self.role = role
        self.on_control = on_control
        self.on_lost = on_lost
        self.welcome = None
        self._welcomed = threading.Event()
        self._refusal = None
        self.peer = None

    def join(self, host, port, node_id=None, hierarchy=None):
        """Register with the scheduler and return the WELCOME it answers; node_id is the
        rank this node asks for among its role (None: the scheduler assigns one);
        hierarchy: why this node cannot take part in one push per host, or None
        (rdmakv/control/hierarchy.py)."""
        config = self.config
        where = netif.format_address(config.scheduler_host, config.scheduler_port)
        deadline = time.monotonic() + config.timeout
        connection = auth.open_connection(self.transport, config.scheduler_host, config.scheduler_port,
                                          auth.load_secret(config), config.timeout, retry_until=deadline,
                                          integrity=config.integrity)
        # Heartbeats both ways: a stopped or hung scheduler is noticed within RDMAKV_TIMEOUT.
        self.peer = Peer(connection, self, f"the scheduler at {where}", silence_limit=config.timeout).start()
        self.peer.send_json(Op.HELLO, {
            "role": self.role, "host": host, "port": port, "node_id": node_id,
            "hostname": socket.gethostname(), "version": protocol.VERSION, "mode": config.mode,
            "host_id": netif.host_identity(), "hierarchy": hierarchy,
        })
        if not self._welcomed.wait(max(0.0, deadline - time.monotonic())):
            self.close()
            raise PeerTimeout(
                f"the scheduler at {where} did not complete the join (every node registered) within {config.timeout:g} s "
                f"(RDMAKV_TIMEOUT): are all {config.num_workers} workers and {config.num_servers} servers started "
                f"with the same DMLC_PS_ROOT_URI/PORT?")
        if self._refusal:
            self.close()
            raise RemoteError(f"the scheduler at {where} refused this {self.role}: {self._refusal}")
        return self.welcome

    def send(self, op, obj=None, **fields):
        self.peer.send_json(op, obj or {}, **fields)

    def on_message(self, peer, header, payload):
        obj = protocol.decode_json(payload or b"{}")
        if not self._welcomed.is_set():
            if header.op == Op.WELCOME:
                self.welcome = obj
            elif header.op == Op.ERROR:
                self._refusal = protocol.peer_text(obj)
            else:
                raise ProtocolError(f"expected WELCOME from the scheduler, got {protocol.op_name(header.op)}")
            self._welcomed.set()
            return
        self.on_control(header, obj)

    def on_closed(self, peer, error):
        if not self._welcomed.is_set():
            self._refusal = f"the connection closed while joining ({error})"
            self._welcomed.set()
        elif error is not None:
            self.on_lost(error)

    def close(self):
        if self.peer is not None:
            self.peer.close()
