"""A verbs connection the native engines run: the same frames as TCP, carried
by rings the peers RDMA-write into (rdmakv/native/verbs_stream.h has the
protocol).  This module builds the verbs objects, trades the rings' places in
the set-up, and speaks the transport contract until an engine takes the link
over (the authentication handshake, a server's first message) and for the
control messages after.

The connector asks for it (connect(native=True): its worker runs the native
data plane), by sending its ring in its set-up message; the listener answers in
kind.  Otherwise the connection is a VerbsConnection (the Python data path,
with its zero-copy offers and rendezvous).  A server whose engine runs refuses
the latter, naming the setting (server.py).

What it costs: a frame is copied into a registered staging ring and out of
the peer's ring, as TCP's kernel copies it; RDMA moves the bytes between.  A
worker's engine avoids both copies for chunks of 64 KiB and more: it registers
the pushpull's source and target in `registrations` (an MRCache, which holds
their exports), RDMA-writes the push from the source into the server's ring,
and the server RDMA-writes the result straight into the target.
"""
import mmap
import os
import socket
import threading

from rdmakv.core import netif, protocol
from rdmakv.core.errors import ConnectionClosed, ProtocolError, VerbsError
from rdmakv.transport.base import Connection, Features, worded
from rdmakv.transport.verbs import qp as verbs_qp
from rdmakv.transport.verbs.devices import SharedDevice
from rdmakv.transport.verbs.mrcache import MRCache

RING_BYTES = 2 << 20           # each direction, both sides alike; a power of two
SEND_DEPTH = 64                # work requests in flight: a write carries up to 256 KiB
RECV_DEPTH = 256               # immediates the peer may send before we repost
CLOSE_DRAIN_SECONDS = 2.0      # close() waits at most this long for our last frames to reach the peer
REGISTERED_BYTES = 512 << 20   # what the worker's engine keeps registered for zero copy, per connection


def _t():
    from rdmakv.native import transport
    return transport


def check_ring(theirs, what):
    """The peer's ring (addr, rkey, bytes) from its set-up message, checked."""
    ring = theirs.get("ring")
    if (not isinstance(ring, list) or len(ring) != 3 or not all(type(x) is int and x >= 0 for x in ring)
            or ring[0] >= 1 << 64 or ring[1] >= 1 << 32):
        raise ProtocolError(f"{what}: bad ring in the set-up message: {ring!r}")
    if ring[2] != RING_BYTES:     # what it makes us pin (our staging mirrors it) is ours to decide
        raise ProtocolError(f"{what}: the peer's ring is {ring[2]} bytes, this side's {RING_BYTES}")
    return ring


def _slab(nbytes):
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class VerbsStreamConnection(Connection):
    """One RC QP to one peer, as a byte stream (see the module doc)."""

    features = Features(plain_frames=True)

    def __init__(self, sock, timeout):
        self._sock = sock
        self._timeout = timeout
        try:
            address = sock.getpeername()
            self.peer, self.source = netif.format_address(*address[:2]), address[0]
        except OSError:
            self.peer = "?"
        self._have_device = False
        self._qp = self._cq = self._channel = self._pd = self._in_mr = self._out_mr = None
        self._stream = None
        self._closed = False
        # Held around every call into the stream, so release() frees it only once none runs.
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._header = bytearray(protocol.HEADER_SIZE)
        self._pid = os.getpid()
        self.read_ahead = None          # the server sets it for every link; a ring reads nothing ahead
        try:
            self._allocate()
        except BaseException:
            self.release()
            raise

    def _allocate(self):
        t = _t()
        ctx, self._port = SharedDevice.acquire()
        self._have_device = True
        self._pd = t.PD(ctx)
        self._channel = t.CompChannel(ctx)
        self._cq = t.CQ(ctx, SEND_DEPTH + RECV_DEPTH, self._channel)
        self._qp = t.QP(self._pd, self._cq, max_send_wr=SEND_DEPTH, max_recv_wr=RECV_DEPTH, max_inline_data=256)
        self._in = _slab(RING_BYTES)
        remote_write = t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE
        self._in_mr = t.MR(self._pd, self._in, remote_write)
        self.registrations = MRCache(self._pd, REGISTERED_BYTES)
        self._qp.modify(t.IBV_QPS_INIT, pkey_index=0, port_num=self._port.port, qp_access_flags=remote_write)
        self._psn = verbs_qp.new_psn()
        self.endpoint = dict(verbs_qp.local_endpoint(self._qp, self._port, self._psn),
                             ring=[self._in_mr.addr, self._in_mr.rkey, RING_BYTES])

    # ---- set-up --------------------------------------------------------------------
    def connect_qp(self, theirs, what):
        """Post the receives, then walk the QP to RTS, connected to the peer's
        endpoint (a checked set-up message)."""
        if "ring" not in theirs:
            raise ProtocolError(f"{what}: the peer answered with the Python data path's set-up, not a stream")
        if theirs.get("gid") is None and self._port.gid_index is not None:
            raise ProtocolError(f"{what}: this port is RoCE but the peer sent no GID")
        addr, rkey, nbytes = check_ring(theirs, what)
        t = _t()
        self._out = _slab(nbytes)       # staging: the peer's ring, mirrored
        self._out_mr = t.MR(self._pd, self._out, t.IBV_ACCESS_LOCAL_WRITE)
        self._stream = t.VerbsStream(self._qp, self._cq, self._channel, self._in_mr, self._out_mr,
                                     self._sock.fileno(), addr, rkey, SEND_DEPTH, RECV_DEPTH)
        verbs_qp.connect_rc(self._qp, self._port, theirs, self._psn,
                            access=t.IBV_ACCESS_LOCAL_WRITE | t.IBV_ACCESS_REMOTE_WRITE)

    def mark_ready(self):
        """Both QPs are connected: the side channel now only tells of the peer's goodbye or death."""
        self._sock.setblocking(False)

    def start_progress(self):
        """Nothing runs in the background: whoever waits polls (verbs_stream.h)."""

    # ---- the transport contract ------------------------------------------------------
    def engine_stream(self):
        """(the side channel's fd, the stream): what a native engine borrows to run this link."""
        return self._sock.fileno(), self._stream

    def _io(self, what, call, *args):
        if self._closed or self._stream is None:
            raise ConnectionClosed(f"{what} {self.peer}: connection already closed")
        return worded(self.peer, self._timeout, what, call, *args)

    def send(self, header, payload=None, in_place=False):
        if in_place:
            raise ValueError("a verbs stream has no shared regions to send in place")
        if len(header) != protocol.HEADER_SIZE:
            raise ProtocolError(f"header is {len(header)} bytes, expected {protocol.HEADER_SIZE}")
        with self._send_lock:
            self._io("send to", self._stream.send_frame, header, payload, self._timeout)
            self.sent_bytes += len(header) + (0 if payload is None else memoryview(payload).nbytes)

    def recv_header(self, idle_timeout):
        with self._recv_lock:
            if not self._io("receive from", self._stream.wait_readable, idle_timeout):
                return None
            self._io("receive from", self._stream.recv_into, self._header, self._timeout)
            self.received_bytes += len(self._header)
            return protocol.unpack(self._header)

    def recv_payload(self, header, destination):
        with self._recv_lock:
            self._io("receive from", self._stream.recv_into, destination, self._timeout)
            self.received_bytes += header.length

    def readable_bytes(self):
        with self._recv_lock:
            if not self._io("receive from", self._stream.wait_readable, 0):
                return 0
            return self._io("receive from", self._stream.available)

    @property
    def copied_bytes(self):
        """Bytes copied into staging or out of our ring (frames, small payloads)."""
        return self._stream.counters()[0] if self._stream is not None else 0

    @property
    def placed_bytes(self):
        """Bytes RDMA-written from where they were: registered payloads, results into their places."""
        return self._stream.counters()[1] if self._stream is not None else 0

    # ---- teardown ---------------------------------------------------------------------
    def shut(self):
        """End every wait on the stream, and tell the peer we are gone, but keep the
        verbs objects: a native engine's threads may still hold the stream (close()
        after the engine's close())."""
        if os.getpid() != self._pid:
            return
        if self._stream is not None:
            self._stream.shut()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        """Let our last frames reach the peer, say goodbye on the side channel, and destroy everything."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None and os.getpid() == self._pid:
            # Not under the send lock: a send stuck on a silent peer must not hold this up.
            self._stream.drain(min(self._timeout, CLOSE_DRAIN_SECONDS))
            try:
                self._sock.setblocking(True)
                self._sock.settimeout(0.5)
                self._sock.sendall(b"B")
            except OSError:
                pass
        self.shut()
        self.release()

    def release(self):
        """Destroy the stream, then QP -> CQ -> MRs -> PD -> channel, and close the
        side channel (the listener calls this for a set-up it refuses).  Once."""
        self._closed = True
        if self._stream is not None:
            self._stream.shut()           # ends the waits of any thread in a call, within a slice
            with self._send_lock, self._recv_lock:
                self._stream.release()
        if self.registrations is not None:
            self.registrations.close()
        for obj in (self._qp, self._cq, self._in_mr, self._out_mr, self._pd, self._channel):
            if obj is not None:
                try:
                    obj.close()
                except VerbsError:
                    pass
        self._qp = self._cq = self._in_mr = self._out_mr = self._pd = self._channel = None
        if self._have_device:
            self._have_device = False
            SharedDevice.release()
        self._sock.close()

    def __repr__(self):
        return f"<VerbsStreamConnection to {self.peer}{' closed' if self._closed else ''}>"
