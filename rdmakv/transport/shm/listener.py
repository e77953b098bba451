"""Setting a shared-memory connection up: the listener's abstract Unix socket
and its set-ups in progress (ShmListener), and the connector's side (connect)."""
import fcntl
import json
import logging
import math
import os
import socket
import struct
import time

import numpy as np

from rdmakv.core import netif
from rdmakv.core.errors import ProtocolError, TransportError
from rdmakv.native import transport as _t
from rdmakv.transport.base import Features, Listener, Region, Throttle
from rdmakv.transport.shm.arena import SHARED_MIN_BYTES, SharedArena
from rdmakv.transport.shm.connection import ShmConnection
from rdmakv.transport.shm.settings import MAX_RING_BYTES, MIN_RING_BYTES, allowed_uids, ring_bytes

log = logging.getLogger("rdmakv.transport.shm")

SETUP_SECONDS = 3.0            # a connector sends its set-up at once: one that has not by then is refused
ANSWER_SECONDS = 2 * SETUP_SECONDS  # how long a connector waits for the answer (the listener may be busy)
MAX_SETUPS = 64                # set-ups in progress at a listener (beyond: refused at once) ...
MAX_SETUPS_PER_UID = 32        # ... and from one uid
SETUP_VERSION = 1


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


class _SetUp:
    """A co-located connector's set-up in progress: its socket, who it is, and until when it may take."""

    def __init__(self, sock, pid, uid, deadline):
        self.sock = sock
        self.uid = uid
        self.name = f"local pid {pid} (shm)"
        self.deadline = deadline


class ShmListener(Listener):
    """The transport underneath's listener, plus the abstract Unix socket
    co-located connectors find it by."""

    def __init__(self, inner, forced, host, port, timeout):
        self._inner = inner.Listener(host, port, timeout)
        self.address = self._inner.address
        self._timeout = timeout
        self._forced = forced
        self._ring_bytes = ring_bytes()
        self._allowed_uids = allowed_uids()
        self._arena = SharedArena()
        self._setups = []             # _SetUps in progress, oldest first
        self._refusals = Throttle()
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

    def watch(self):
        fds, wake = self._inner.watch()
        if self._unix is None:
            return fds, wake
        fds = fds + [self._unix.fileno()] + [setup.sock.fileno() for setup in self._setups]
        if self._setups:
            wake = min(self._setups[0].deadline, wake or math.inf)
        return fds, wake

    def accept(self, timeout):
        return self.wait_ready(timeout, self._accept_ready)

    def _accept_ready(self):
        """A connection that is ready now, or None; never waits.  New co-located
        connectors join the set-ups in progress, which advance as their bytes come."""
        if self._unix is not None:
            for _ in range(MAX_SETUPS):            # then give the others a turn
                try:
                    sock, _ = self._unix.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    break
                self._admit(sock)
            connection = self.advance_setups(
                self._setups, lambda setup: self._refuse(setup.sock, setup.name,
                                                         f"no set-up within {SETUP_SECONDS:g} s"), self._advance)
            if connection is not None:
                return connection
        return self._inner.accept(0)

    def _admit(self, sock):
        """Start the set-up of a new co-located connector, or refuse it at once."""
        try:
            sock.setblocking(False)
            pid, uid = _peer_credentials(sock)
        except OSError as exc:
            self._refuse(sock, "a local process (shm)", f"no credentials: {exc}")
            return
        name = f"local pid {pid} uid {uid} (shm)"
        if uid not in self._allowed_uids:
            self._refuse(sock, name, f"uid {uid} may not share memory with this process (uid {os.getuid()}); "
                                     f"RDMAKV_SHM_ALLOW_UIDS lists the uids that may")
        elif len(self._setups) >= MAX_SETUPS:
            self._refuse(sock, name, f"{MAX_SETUPS} shared-memory set-ups are already in progress")
        elif sum(setup.uid == uid for setup in self._setups) >= MAX_SETUPS_PER_UID:
            self._refuse(sock, name, f"{MAX_SETUPS_PER_UID} shared-memory set-ups of uid {uid} are already "
                                     f"in progress")
        else:
            self._setups.append(_SetUp(sock, pid, uid, time.monotonic() + min(SETUP_SECONDS, self._timeout)))

    def _refuse(self, sock, name, reason):
        self._refusals.warn(log, "shared-memory connections refused",
                            "refused a shared-memory connection from %s: %s", name, reason)
        try:
            sock.send(json.dumps({"ok": False, "error": reason}).encode() + b"\n", socket.MSG_DONTWAIT)
        except OSError:
            pass
        sock.close()

    def _advance(self, setup):
        """The acceptor's side of one set-up: a ShmConnection once its message is
        in, False while it is not, None (after refusing it) if it fails."""
        memfd = -1
        try:
            try:
                data, fds, flags, _ = socket.recv_fds(setup.sock, 4096, 1, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            if fds:
                memfd = fds[0]
            for extra in fds[1:]:
                os.close(extra)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("its memory fd could not be received (out of descriptors?)")
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
            channel = _t.ShmChannel(memfd, setup.sock.fileno(), size, False)
            os.close(memfd)
            memfd = -1
            setup.sock.send(b'{"ok": true}\n', socket.MSG_DONTWAIT)     # an empty socket takes a line
            return ShmConnection(setup.sock, channel, setup.name, self._timeout, self._arena,
                                 source=f"local uid {setup.uid}")
        except (OSError, ValueError, ProtocolError) as exc:
            self._refuse(setup.sock, setup.name, str(exc))
            return None
        finally:
            if memfd >= 0:
                os.close(memfd)

    @property
    def features(self):
        return Features(shares=self._unix is not None)

    def allocate(self, nbytes):
        """A writable uint8 array whose bytes co-located peers read in place
        when it is sent to them and write into once exposed (see SharedArena);
        a plain one where that cannot help."""
        if self._unix is None or nbytes < SHARED_MIN_BYTES:
            return np.empty(nbytes, np.uint8)
        return self._arena.allocate(nbytes)

    def region(self, buffer):
        found = self._arena.find(buffer)
        if found is None:
            return None
        segment, offset = found
        return Region(segment.number, offset, segment.memory, buffer.nbytes, None)

    def close(self):
        if self._unix is not None:
            self._unix.close()
        for setup in self._setups:
            setup.sock.close()
        self._setups = []
        self._arena.close()
        self._inner.close()


def connect(host, port, timeout, forced):
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
        if uid not in allowed_uids():
            raise TransportError(f"the process at its shared-memory socket runs as uid {uid}, not {os.getuid()} "
                                 f"(RDMAKV_SHM_ALLOW_UIDS lists the other uids that may)")
        size = ring_bytes()
        memfd = os.memfd_create("rdmakv-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, _t.shm_segment_bytes(size))
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        channel = _t.ShmChannel(memfd, sock.fileno(), size, True)
        deadline = time.monotonic() + min(ANSWER_SECONDS, timeout)
        sock.settimeout(ANSWER_SECONDS)
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
    except (OSError, EOFError, ValueError, TransportError, ProtocolError) as exc:
        sock.close()
        if forced:
            raise TransportError(f"shared memory with {where} failed: {exc}") from None
        log.warning("shared memory with %s failed, using the transport underneath: %s", where, exc)
        return None
    finally:
        if memfd >= 0:
            os.close(memfd)
