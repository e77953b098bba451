"""Mutual challenge-response authentication for every rdmakv connection.

With a cluster secret (RDMAKV_SECRET, or the file named by RDMAKV_SECRET_FILE)
the accepting side sends a random challenge; the connecting side answers with
HMAC-SHA256(secret, challenge and its own nonce) and the acceptor proves
itself back the same way.  Digests are compared in constant time.  Nothing
else is accepted on a connection until this succeeds, so an outsider can
neither join, push, pull nor read the address book.  Without a secret the
exchange still runs, so a mismatch (one side with a secret, one without) is
refused with a clear reason instead of failing later.

With RDMAKV_INTEGRITY both sides also derive two keys from the secret and
both nonces (one per direction, fresh for every connection) and hand them to
the connection, which then MACs every frame (TCP; see README "Security").
Both sides must agree on the setting; it is bound into the handshake's MACs,
so a man in the middle cannot switch it off."""
import hashlib
import hmac
import logging
import os
import time

from rdmakv.core import protocol
from rdmakv.core.errors import ConfigError, ProtocolError, RdmaKVError
from rdmakv.core.protocol import Op

NONCE_BYTES = 32
log = logging.getLogger("rdmakv.auth")
_unprotected_kinds = set()     # connection classes already reported as carrying no MAC


class AuthenticationError(RdmaKVError):
    """A peer could not prove it holds the cluster secret (or we could not)."""


class Busy(AuthenticationError):
    """The acceptor had too many connections authenticating to take this one."""


def _mac(secret, label, first, second, integrity):
    label += b"+integrity" if integrity else b""
    return hmac.new(secret, b"rdmakv-auth-v1|" + label + b"|" + first + second, hashlib.sha256).hexdigest()


def _check_integrity_setting(connection, theirs, ours):
    if theirs is not ours:
        raise AuthenticationError(
            f"{connection.peer} {'requires' if theirs else 'does not use'} RDMAKV_INTEGRITY but this node "
            f"{'does' if ours else 'does not'}: set the same on every node")


def _protect(connection, secret, challenge, nonce, acceptor):
    """Per-frame MACs from now on, where the transport offers them (TCP)."""
    protect = getattr(connection, "protect", None)
    if protect is None:
        kind = type(connection).__name__
        if kind not in _unprotected_kinds:
            _unprotected_kinds.add(kind)
            log.info("RDMAKV_INTEGRITY covers TCP only: %s connections carry no MAC (shared memory stays on "
                     "this host, verbs relies on the fabric; see README, Security)", kind)
        return
    session = hmac.digest(secret, b"rdmakv-integrity-v1|" + challenge + nonce, "sha256")
    to_acceptor = hmac.digest(session, b"to the acceptor", "sha256")
    to_connector = hmac.digest(session, b"to the connector", "sha256")
    if acceptor:
        protect(send_key=to_connector, recv_key=to_acceptor)
    else:
        protect(send_key=to_acceptor, recv_key=to_connector)


MAX_HANDSHAKE_BYTES = 4096
BUSY = "busy"           # set in a refusal that says: the acceptor was full, try again
BUSY_RETRY_SECONDS = (0.01, 0.5)


def _check_header(header, expected):
    """header, if it may start the handshake message `expected` (or the peer's ERROR)."""
    if header.op not in (expected, Op.ERROR):
        raise ProtocolError(f"expected {protocol.op_name(expected)} during the handshake, "
                            f"got {protocol.op_name(header.op)}")
    if header.length > MAX_HANDSHAKE_BYTES:
        raise ProtocolError(f"handshake message of {header.length} bytes")
    return header


def _read_message(connection, header):
    """The JSON payload of a checked handshake header; the peer's ERROR is raised."""
    payload = bytearray(header.length)
    if header.length:
        connection.recv_payload(header, payload)
    obj = protocol.decode_json(payload)
    if header.op == Op.ERROR:
        kind = Busy if obj.get(BUSY) is True else AuthenticationError
        raise kind(f"{connection.peer} refused this connection: {protocol.peer_text(obj)}")
    return obj


def _receive(connection, expected, timeout):
    header = connection.recv_header(timeout)
    if header is None:
        raise AuthenticationError(f"{connection.peer} sent nothing during the authentication handshake")
    return _read_message(connection, _check_header(header, expected))


def _send(connection, op, obj):
    payload = protocol.encode_json(obj)
    connection.send(protocol.pack(op, length=len(payload)), payload)


def _nonce(obj, field):
    try:
        value = bytes.fromhex(obj[field])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"handshake without a valid {field}") from None
    if len(value) != NONCE_BYTES:
        raise ProtocolError(f"handshake {field} of {len(value)} bytes")
    return value


def accept(connection, secret, timeout, integrity=False):
    """Run the acceptor's side; raises AuthenticationError if the peer fails it, after telling it why."""
    challenge = Challenge(connection, secret, integrity)
    try:
        answer = _receive(connection, Op.AUTH, timeout)
    except (AuthenticationError, ProtocolError) as exc:
        challenge.refuse(exc)
        raise
    challenge.verify(answer)


class Challenge:
    """The acceptor's side in steps, for a caller that waits on many connections
    at once and must never block on one (node.Gate): the constructor sends
    CHALLENGE, step() goes on only with bytes already there."""

    def __init__(self, connection, secret, integrity=False):
        self.connection = connection
        self.secret = secret
        self.integrity = integrity
        self._challenge = os.urandom(NONCE_BYTES)
        self._header = None
        _send(connection, Op.CHALLENGE, {"nonce": self._challenge.hex(), "auth": secret is not None,
                                         "integrity": integrity})

    def step(self):
        """True once the peer is authenticated (AUTH_OK sent), False while its
        answer is incomplete; raises to refuse it, after telling it why."""
        try:
            available = self.connection.readable_bytes()
            if self._header is None:
                if available < protocol.HEADER_SIZE:
                    return False
                self._header = _check_header(self.connection.recv_header(0), Op.AUTH)
                available -= protocol.HEADER_SIZE
            if available < self._header.length:
                return False
            answer = _read_message(self.connection, self._header)
        except (AuthenticationError, ProtocolError) as exc:
            self.refuse(exc)
            raise
        self.verify(answer)
        return True

    def verify(self, answer):
        """Check the peer's AUTH and answer AUTH_OK (then, with RDMAKV_INTEGRITY,
        MAC every frame), or refuse it."""
        try:
            self._verify(answer)
        except (AuthenticationError, ProtocolError) as exc:
            self.refuse(exc)
            raise

    def _verify(self, answer):
        connection, secret, integrity = self.connection, self.secret, self.integrity
        _check_integrity_setting(connection, answer.get("integrity", False), integrity)
        if secret is None:
            if answer.get("mac") is not None:
                raise AuthenticationError(f"{connection.peer} uses a cluster secret but this node has none")
            _send(connection, Op.AUTH_OK, {})
            return
        nonce = _nonce(answer, "nonce")
        given = answer.get("mac")
        if not isinstance(given, str) or not hmac.compare_digest(
                given.encode(), _mac(secret, b"client", self._challenge, nonce, integrity).encode()):
            raise AuthenticationError(f"{connection.peer} failed authentication (wrong or missing RDMAKV_SECRET)")
        _send(connection, Op.AUTH_OK, {"mac": _mac(secret, b"server", nonce, self._challenge, integrity)})
        if integrity:
            _protect(connection, secret, self._challenge, nonce, acceptor=True)

    def refuse(self, error):
        """Tell the peer why it is refused (with a secret, only that it failed)."""
        try:
            _send(self.connection, Op.ERROR, {"message": "authentication failed" if self.secret else str(error)})
        except RdmaKVError:
            pass


def connect(connection, secret, timeout, integrity=False):
    """Run the connecting side; raises AuthenticationError if the acceptor fails it."""
    challenge_msg = _receive(connection, Op.CHALLENGE, timeout)
    challenge = _nonce(challenge_msg, "nonce")
    _check_integrity_setting(connection, challenge_msg.get("integrity", False), integrity)
    wants_auth = challenge_msg.get("auth") is True
    if wants_auth and secret is None:
        raise AuthenticationError(f"{connection.peer} requires a cluster secret: set RDMAKV_SECRET "
                                  f"or RDMAKV_SECRET_FILE")
    if not wants_auth and secret is not None:
        raise AuthenticationError(f"{connection.peer} does not authenticate but RDMAKV_SECRET is set here: "
                                  f"refusing to talk to an unauthenticated cluster")
    if secret is None:
        _send(connection, Op.AUTH, {"integrity": False})
        _receive(connection, Op.AUTH_OK, timeout)
        return
    nonce = os.urandom(NONCE_BYTES)
    _send(connection, Op.AUTH, {"nonce": nonce.hex(), "mac": _mac(secret, b"client", challenge, nonce, integrity),
                                "integrity": integrity})
    reply = _receive(connection, Op.AUTH_OK, timeout)
    given = reply.get("mac")
    if not isinstance(given, str) or not hmac.compare_digest(
            given.encode(), _mac(secret, b"server", nonce, challenge, integrity).encode()):
        raise AuthenticationError(f"{connection.peer} could not prove it holds the cluster secret")
    if integrity:
        _protect(connection, secret, challenge, nonce, acceptor=False)


def open_connection(transport, host, port, secret, timeout, retry_until=None, integrity=False, native=False):
    """Connect and authenticate; the connection is closed again if the handshake fails.
    An acceptor too busy to take us is tried again until retry_until (else timeout).
    native: the caller means to run the link on a native engine (transport.connect)."""
    deadline = time.monotonic() + timeout if retry_until is None else retry_until
    pause = BUSY_RETRY_SECONDS[0]
    while True:
        connection = transport.connect(host, port, timeout, retry_until=retry_until, native=native)
        try:
            connect(connection, secret, timeout, integrity)
            return connection
        except Busy:
            connection.close()
            if time.monotonic() + pause >= deadline:
                raise
        except BaseException:
            connection.close()
            raise
        time.sleep(pause)
        pause = min(BUSY_RETRY_SECONDS[1], 2 * pause)


def load_secret(config):
    """The secret as bytes, or None."""
    if config.secret:
        return config.secret.encode()
    if config.secret_file:
        try:
            with open(config.secret_file, "rb") as source:
                secret = source.read().strip()
        except OSError as exc:
            raise ConfigError(f"RDMAKV_SECRET_FILE {config.secret_file!r}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"RDMAKV_SECRET_FILE {config.secret_file!r} is empty")
        return secret
    return None
