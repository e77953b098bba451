"""Shared memory between co-located peers: a layer over another transport
(TCP, or verbs) that moves a connection's bytes through memory both processes
map whenever the two ends run on the same host, and hands every other
connection to the transport underneath.

Set-up.  A listener also listens on an abstract Unix socket named after its
own address ("rdmakv-shm/<numeric host>/<port>").  Abstract names live in the
kernel's network namespace and vanish with the socket, so reaching one proves
the listener shares this kernel (same host, same network namespace) and
leaves no file behind, ever.  The connector tries that name first; where
nothing answers (another host, a plain TCP listener such as the scheduler,
RDMAKV_SHM=0 there) it connects with the transport underneath instead.  On a
hit the connector creates the segment as an anonymous memory file
(memfd_create, sealed against shrinking, so the peer can never make our
mapping fault), passes its fd over the socket (SCM_RIGHTS) with the ring size,
and both sides map it and close the fd: there is no name in /dev/shm at any
moment, and the kernel frees the memory once both mappings are gone, crash or
not.  The Unix socket stays open and silent: any event on it means the peer's
process is gone.

Data path.  Two single-producer/single-consumer byte rings, one per
direction (rdmakv/_shm.h): the sender copies header and payload in, the
receiver copies straight out into the destination buffer, in pieces, so a
large payload streams through a ring of any size.  Acquire/release counters,
futex sleeps only when a side has nothing to do, every wait bounded.

The stream carries exactly what the TCP transport carries, so authentication,
the KVStore and the server run over it unchanged."""
import errno
import fcntl
import json
import logging
import os
import select
import socket
import struct
import threading
import time

from rdmakv import netif, protocol
from rdmakv._native import transport as _t
from rdmakv.errors import ConfigError, ConnectionClosed, EndOfStream, PeerTimeout, ProtocolError, TransportError
from rdmakv.transport.base import Connection, Listener

log = logging.getLogger("rdmakv.transport.shm")

MiB = 1 << 20
DEFAULT_RING_BYTES = 16 * MiB
MIN_RING_BYTES = 64 * 1024
MAX_RING_BYTES = 1 << 30
SETUP_SECONDS = 5.0            # bound on the set-up exchange (a local peer that stalls it is refused)
SETUP_VERSION = 1
_OFF = ("0", "false", "no", "off")


def ring_bytes(environ=None):
    """The per-direction ring size from RDMAKV_SHM_RING_BYTES (a power of two)."""
    environ = os.environ if environ is None else environ
    text = environ.get("RDMAKV_SHM_RING_BYTES", "")
    if text == "":
        return DEFAULT_RING_BYTES
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"RDMAKV_SHM_RING_BYTES={text!r} is not an integer") from None
    if not MIN_RING_BYTES <= value <= MAX_RING_BYTES or value & (value - 1):
        raise ConfigError(f"RDMAKV_SHM_RING_BYTES={value} must be a power of two between "
                          f"{MIN_RING_BYTES} and {MAX_RING_BYTES}")
    return value


def unavailable():
    """Why shared memory cannot work in this process, or None."""
    if not hasattr(os, "memfd_create") or not hasattr(socket, "send_fds") or not hasattr(fcntl, "F_ADD_SEALS"):
        return "this Python lacks memfd_create, SCM_RIGHTS helpers or file seals"
    return None


def wanted(transport, environ=None):
    """(whether connections to co-located peers use shared memory, why), for a
    configured transport name.  RDMAKV_SHM=0 forbids it; RDMAKV_TRANSPORT=shm
    demands it (set-up failures with a co-located peer are then errors, not
    a quiet fall-back)."""
    environ = os.environ if environ is None else environ
    off = environ.get("RDMAKV_SHM", "").strip().lower() in _OFF
    if transport == "shm":
        if off:
            raise ConfigError("RDMAKV_TRANSPORT=shm contradicts RDMAKV_SHM=0")
        missing = unavailable()
        if missing:
            raise ConfigError(f"RDMAKV_TRANSPORT=shm: {missing}")
        ring_bytes(environ)
        return True, "RDMAKV_TRANSPORT=shm: shared memory with co-located peers"
    if transport != "auto":
        return False, f"RDMAKV_TRANSPORT={transport}"
    if off:
        return False, "RDMAKV_SHM=0"
    missing = unavailable()
    if missing:
        return False, f"no shared memory: {missing}"
    ring_bytes(environ)
    return True, "auto: shared memory with co-located peers"


def _endpoint(host, port):
    """The abstract socket name of the listener at (host, port), or None if host does not resolve."""
    try:
        _, sockaddr = netif.resolve(host, port)
    except Exception:  # noqa: BLE001 - the transport underneath reports a bad address
        return None
    return f"\0rdmakv-shm/{sockaddr[0]}/{sockaddr[1]}".encode()


def _peer_credentials(sock):
    """(pid, uid) of the process at the other end of a Unix socket, from the kernel."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _recv_line(sock, deadline, limit=4096):
    data = b""
    while not data.endswith(b"\n"):
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(limit - len(data))
        if not chunk:
            raise EOFError("closed during the shared-memory set-up")
        data += chunk
        if len(data) >= limit:
            raise ProtocolError("shared-memory set-up message too long")
    return json.loads(data)


class ShmConnection(Connection):
    def __init__(self, sock, channel, peer, timeout):
        self._sock = sock
        self._channel = channel
        self.peer = peer
        self._timeout = timeout
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._header = bytearray(protocol.HEADER_SIZE)
        self._closed = False
        self._pid = os.getpid()

    def _io(self, what, call, *args):
        if self._closed:
            raise ConnectionClosed(f"{what} {self.peer}: connection already closed")
        try:
            return call(*args)
        except TimeoutError:
            raise PeerTimeout(f"{what} {self.peer}: no progress for {self._timeout:g} s (RDMAKV_TIMEOUT)") from None
        except EOFError:
            raise EndOfStream(f"{self.peer} closed the connection") from None
        except ConnectionAbortedError:
            raise ConnectionClosed(f"{what} {self.peer}: connection closed") from None
        except ConnectionResetError:
            raise ConnectionClosed(f"{what} {self.peer}: the peer left mid-message") from None
        except ValueError as exc:
            raise ProtocolError(f"{what} {self.peer}: {exc}") from None
        except OSError as exc:
            raise TransportError(f"{what} {self.peer}: {exc}") from None

    def send(self, header, payload=None):
        with self._send_lock:
            self._io("send to", self._channel.send_frame, header, payload, self._timeout)

    def recv_header(self, idle_timeout):
        with self._recv_lock:
            if not self._io("receive from", self._channel.wait_readable, idle_timeout):
                return None
            self._io("receive from", self._channel.recv_into, self._header, self._timeout)
        return protocol.unpack(self._header)

    def recv_payload(self, header, destination):
        with self._recv_lock:
            try:
                self._io("receive from", self._channel.recv_into, destination, self._timeout)
            except EndOfStream:
                raise ConnectionClosed(f"receive from {self.peer}: the peer left mid-message") from None

    def close(self):
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return              # a forked child must not end its parent's connection
        self._channel.shutdown()             # the peer sees the end; our blocked threads wake
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # The mapping and the fd must outlive every thread still inside a call.
        with self._send_lock, self._recv_lock:
            self._channel.unmap()
            self._sock.close()


class ShmListener(Listener):
    """The transport underneath's listener, plus the abstract Unix socket
    co-located connectors find it by."""

    def __init__(self, inner, forced, host, port, timeout):
        self._inner = inner.Listener(host, port, timeout)
        self.address = self._inner.address
        self._timeout = timeout
        self._forced = forced
        self._ring_bytes = ring_bytes()
        self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            name = _endpoint(*self.address)
            if name is None:
                raise OSError(f"{self.address[0]!r} does not resolve")
            self._unix.bind(name)
            self._unix.listen(128)
        except OSError as exc:
            self._unix.close()
            self._unix = None
            if forced:
                self._inner.close()
                raise TransportError(f"cannot offer shared memory at {netif.format_address(*self.address)}: {exc}")
            log.warning("shared memory not offered at %s: %s", netif.format_address(*self.address), exc)
        else:
            self._unix.setblocking(False)

    def accept(self, timeout):
        if self._unix is None:
            return self._inner.accept(timeout)
        inner_fd = self._inner.fileno() if hasattr(self._inner, "fileno") else None
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock, _ = self._unix.accept()
            except (BlockingIOError, InterruptedError):
                pass
            else:
                connection = self._setup(sock)
                if connection is not None:
                    return connection
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if inner_fd is None:           # cannot watch both: take turns in short slices
                connection = self._inner.accept(min(left, 0.05))
                if connection is not None:
                    return connection
                continue
            poller = select.poll()
            try:
                poller.register(self._unix.fileno(), select.POLLIN)
                poller.register(inner_fd, select.POLLIN)
            except ValueError:                 # closed meanwhile (fileno() is -1)
                raise OSError(errno.EBADF, "listener closed") from None
            ready = {fd for fd, _ in poller.poll(max(1, int(left * 1000)))}
            if inner_fd in ready:
                connection = self._inner.accept(0)
                if connection is not None:
                    return connection

    def _setup(self, sock):
        """The acceptor's side of the set-up; None (after logging why) if it fails."""
        memfd = -1
        try:
            pid, _ = _peer_credentials(sock)
            peer = f"local pid {pid} (shm)"
        except OSError:
            peer = "a local process (shm)"
        try:
            deadline = time.monotonic() + min(SETUP_SECONDS, self._timeout)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data, fds, _, _ = socket.recv_fds(sock, 4096, 1)
            if fds:
                memfd = fds[0]
            for extra in fds[1:]:
                os.close(extra)
            hello = json.loads(data) if data else None
            if not isinstance(hello, dict) or hello.get("rdmakv_shm") != SETUP_VERSION or memfd < 0:
                raise ProtocolError("not an rdmakv shared-memory set-up")
            size = hello.get("ring_bytes")
            if (not isinstance(size, int) or not MIN_RING_BYTES <= size <= MAX_RING_BYTES or size & (size - 1)):
                raise ProtocolError(f"ring size {size!r} is not a power of two in range")
            if os.fstat(memfd).st_size != _t.shm_segment_bytes(size):
                raise ProtocolError("the segment's size does not match its ring size")
            seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
            if not seals & fcntl.F_SEAL_SHRINK:
                raise ProtocolError("the segment is not sealed against shrinking")
            channel = _t.ShmChannel(memfd, sock.fileno(), size, False)
            os.close(memfd)
            memfd = -1
            sock.sendall(b'{"ok": true}\n')
            sock.setblocking(False)
            return ShmConnection(sock, channel, peer, self._timeout)
        except (OSError, ValueError, ProtocolError) as exc:
            log.warning("refused a shared-memory connection from %s: %s", peer, exc)
            try:
                sock.sendall(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n")
            except OSError:
                pass
            sock.close()
            return None
        finally:
            if memfd >= 0:
                os.close(memfd)

    def fileno(self):
        return self._inner.fileno() if hasattr(self._inner, "fileno") else -1

    def close(self):
        if self._unix is not None:
            self._unix.close()
        self._inner.close()


def _connect_shm(host, port, timeout, forced):
    """A ShmConnection to the listener at (host, port) if it is co-located and
    offers shared memory, else None."""
    name = _endpoint(host, port)
    if name is None:
        return None
    where = netif.format_address(host, port)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(name)
    except OSError:
        sock.close()             # nothing co-located listens there
        return None
    memfd = -1
    try:
        # Anyone on this host may bind an abstract name first.  A squatter of
        # another user is never handed our memory; one of ours (or anyone,
        # without a cluster secret) still meets the authentication on top.
        _, uid = _peer_credentials(sock)
        if uid != os.getuid():
            raise TransportError(f"the process at its shared-memory socket runs as uid {uid}, not {os.getuid()}")
        size = ring_bytes()
        memfd = os.memfd_create("rdmakv-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, _t.shm_segment_bytes(size))
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        channel = _t.ShmChannel(memfd, sock.fileno(), size, True)
        deadline = time.monotonic() + min(SETUP_SECONDS, timeout)
        sock.settimeout(SETUP_SECONDS)
        hello = {"rdmakv_shm": SETUP_VERSION, "ring_bytes": size, "pid": os.getpid()}
        socket.send_fds(sock, [json.dumps(hello).encode()], [memfd])
        os.close(memfd)
        memfd = -1
        reply = _recv_line(sock, deadline)
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            channel.unmap()
            raise TransportError(f"{where} refused shared memory: "
                                 f"{reply.get('error') if isinstance(reply, dict) else reply!r}")
        sock.setblocking(False)
        return ShmConnection(sock, channel, f"{where} (shm)", timeout)
    except (OSError, ValueError, TransportError, ProtocolError) as exc:
        sock.close()
        if forced:
            raise TransportError(f"shared memory with {where} failed: {exc}") from None
        log.warning("shared memory with %s failed, using the transport underneath: %s", where, exc)
        return None
    finally:
        if memfd >= 0:
            os.close(memfd)


class Layer:
    """Shared memory over `inner` (a transport module): exports Listener and
    connect like every transport module."""

    def __init__(self, inner, forced=False):
        self.inner = inner
        self.forced = forced
        self.__name__ = f"rdmakv.transport.shm over {inner.__name__}"

    def Listener(self, host, port, timeout):   # noqa: N802 - the name every transport exports
        return ShmListener(self.inner, self.forced, host, port, timeout)

    def connect(self, host, port, timeout, retry_until=None):
        connection = _connect_shm(host, port, timeout, self.forced)
        if connection is not None:
            return connection
        return self.inner.connect(host, port, timeout, retry_until=retry_until)


def over(inner, forced=False):
    return Layer(inner, forced)
