"""One shared-memory connection: two byte rings in a memory file both
processes map, a Unix socket beside them for segment fds and liveness, and the
shared results and exposed regions (see the package's documentation)."""
import fcntl
import mmap
import os
import select
import socket
import struct
import threading
import time

from rdmakv.core import protocol
from rdmakv.core.errors import ConnectionClosed, EndOfStream, ProtocolError, TransportError
from rdmakv.native import transport as _t
from rdmakv.transport.base import Connection, Features, Region, worded
from rdmakv.transport.shm.arena import SEGMENT, SUM_CONTROL_BYTES

MAX_SHARED_SEGMENTS = 4096     # a peer sharing more is refused (each costs us a mapping)
# Header flag bits private to this layer (stripped on receipt; wire.h's RK_SHARED_FLAGS):
SHARED_PAYLOAD = 1 << 31       # a PLACE follows, not the bytes
EXPOSE = 1 << 30               # not a message: the header names a tag stream, EXPOSED follows (expose)
IN_PLACE = 1 << 29             # the payload is already in the region exposed for its stream: no bytes follow
PRIVATE_FLAGS = SHARED_PAYLOAD | EXPOSE | IN_PLACE
_FLAGS = struct.Struct("<I")
PLACE = struct.Struct("<IQ")    # in the ring instead of the payload: segment number, offset
EXPOSED = struct.Struct("<IQIQQ")  # two exposed buffers (segment, offset each) and their size


def _flagged(header, bit):
    """header (bytes) with a private flag bit set."""
    header = bytearray(header)
    _FLAGS.pack_into(header, protocol.FLAGS_OFFSET, _FLAGS.unpack_from(header, protocol.FLAGS_OFFSET)[0] | bit)
    return header


class ShmConnection(Connection):
    def __init__(self, sock, channel, peer, timeout, arena=None, source="?"):
        self._sock = sock
        self._channel = channel
        self.peer = peer
        self.source = source
        self._timeout = timeout
        self._arena = arena
        self._shared_with_peer = set()    # numbers of our segments the peer has
        self._peer_segments = {}          # number -> mmap of the peer's segment
        self._place_follows = False       # the header just read announced a PLACE, not bytes
        self._peer_regions = {}           # tag stream -> the two Regions the peer exposed to us
        self._exposed = {}                # tag stream -> nbytes: our buffers the peer writes into
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._header = bytearray(protocol.HEADER_SIZE)
        self._closed = False
        self._pid = os.getpid()

    def _io(self, what, call, *args):
        if self._closed:
            raise ConnectionClosed(f"{what} {self.peer}: connection already closed")
        return worded(self.peer, self._timeout, what, call, *args)

    # The ring carries a header and its payload only, which the native engines speak.
    features = Features(shares=True, plain_frames=True)

    def guard(self, what, call, *args):
        """call(*args), which touches this connection's shared memory (a Region
        from peer_regions), with its failures worded as this connection's:
        PeerTimeout after the timeout, ConnectionClosed once closed locally.
        Under the send lock, so close() unmaps nothing while the call runs."""
        with self._send_lock:
            return self._io(what, call, *args)

    def engine_stream(self):
        """(the Unix socket's fd, the channel): what a native engine borrows to run this link."""
        return self._sock.fileno(), self._channel

    def send(self, header, payload=None, in_place=False):
        with self._send_lock:
            if in_place:
                self._check_in_place(header, payload)
                header = _flagged(header, IN_PLACE)
            place = self._arena.locate(payload) if self._arena is not None and payload is not None else None
            if place is not None:
                segment, offset = place
                self._share(segment)
                header = _flagged(header, SHARED_PAYLOAD)
                payload = PLACE.pack(segment.number, offset)
            self._io("send to", self._channel.send_frame, header, payload, self._timeout)
            self.sent_bytes += len(header) + (0 if payload is None else memoryview(payload).nbytes)

    def _check_in_place(self, header, payload):
        """An in_place send must name a stream the peer exposed, with its size, and carry no bytes."""
        tag = protocol.tag_of_frame(header)
        regions = self._peer_regions.get(tag.stream)
        length = protocol.HEADER.unpack_from(header)[9]
        if payload is not None or regions is None or regions[0].nbytes != length:
            raise ValueError(f"an in-place send of {tag} ({length} bytes) without a region the peer exposed for it")

    def peer_regions(self, stream):
        return self._peer_regions.get(stream)

    def expose(self, stream, buffers):
        with self._send_lock:
            header, body, _ = self.exposure(stream, buffers)
            self._io("send to", self._channel.send_frame, header, body, self._timeout)
            self.sent_bytes += len(header) + len(body)

    def exposure(self, stream, buffers):
        """Share the segments of two buffers (from the listener's allocate())
        with the peer; returns the frame that exposes them under `stream`
        (header, body) and the segments' numbers.  Whoever writes the ring sends
        the frame: this side (expose), or a native engine."""
        places = [self._arena.find(buffer) if self._arena is not None else None for buffer in buffers]
        if len(places) != 2 or None in places:
            raise ValueError("expose takes two buffers from the listener's allocate()")
        for segment, _ in places:
            self._share(segment)
        self._exposed[stream] = buffers[0].nbytes
        (even, even_offset), (odd, odd_offset) = places
        body = EXPOSED.pack(even.number, even_offset, odd.number, odd_offset, buffers[0].nbytes)
        header = _flagged(protocol.tagged_header(protocol.Tag(stream, 0), EXPOSED.size), EXPOSE)
        return header, body, (even.number, odd.number)

    def _share(self, segment):
        """Pass a segment's fd to the peer, ahead of the first frame that names it
        (the caller holds the send lock)."""
        if segment.number not in self._shared_with_peer:
            self._io("send to", self._arena.pass_segment, self._sock, segment)
            self._shared_with_peer.add(segment.number)

    def recv_header(self, idle_timeout):
        with self._recv_lock:
            while True:
                if not self._io("receive from", self._channel.wait_readable, idle_timeout):
                    return None
                self._io("receive from", self._channel.recv_into, self._header, self._timeout)
                self.received_bytes += len(self._header)
                flags = _FLAGS.unpack_from(self._header, protocol.FLAGS_OFFSET)[0]
                private = flags & PRIVATE_FLAGS
                if private:
                    _FLAGS.pack_into(self._header, protocol.FLAGS_OFFSET, flags & ~PRIVATE_FLAGS)
                header = protocol.unpack(self._header)
                if private == EXPOSE:
                    self._take_exposure(header)
                    continue
                self._place_follows = private == SHARED_PAYLOAD
                if self._place_follows and header.length == 0:
                    raise ProtocolError(f"receive from {self.peer}: a shared payload of 0 bytes")
                if private == IN_PLACE:
                    return self._in_place(header)
                if private and not self._place_follows:
                    raise ProtocolError(f"receive from {self.peer}: private flags 0x{private:x} together")
                return header

    def readable_bytes(self):
        # Arrivals in the ring wake no descriptor: fileno() stays -1.
        if not self._io("receive from", self._channel.wait_readable, 0):
            return 0
        return self._io("receive from", self._channel.available)

    def _take_exposure(self, header):
        """Record the regions the peer exposes to us (the caller holds the receive lock)."""
        if self._arena is not None or header.length != EXPOSED.size:
            raise ProtocolError(f"receive from {self.peer}: a malformed shared-sum offer")
        raw = bytearray(EXPOSED.size)
        self._io("receive from", self._channel.recv_into, raw, self._timeout)
        self.received_bytes += len(raw)
        even, even_offset, odd, odd_offset, nbytes = EXPOSED.unpack(raw)
        regions = []
        for number, offset in ((even, even_offset), (odd, odd_offset)):
            memory = self._peer_segment(number)
            if (not nbytes or offset < SUM_CONTROL_BYTES or offset % SUM_CONTROL_BYTES
                    or offset + nbytes > len(memory)):
                raise ProtocolError(f"receive from {self.peer}: a shared sum of {nbytes} bytes at offset "
                                    f"{offset} does not fit segment {number}")
            regions.append(Region(number, offset, memory, nbytes, self._channel))
        self._peer_regions[protocol.tag_of(header).stream] = tuple(regions)

    def _in_place(self, header):
        """A message whose payload the peer wrote into a region we exposed: checked, and flagged for the layer above."""
        nbytes = self._exposed.get(protocol.tag_of(header).stream)
        if nbytes is None or header.length != nbytes:
            raise ProtocolError(f"receive from {self.peer}: a message of {protocol.tag_of(header)} written in "
                                f"place without a region exposed for it")
        return header._replace(flags=header.flags | protocol.FLAG_IN_PLACE)

    def recv_payload(self, header, destination):
        with self._recv_lock:
            try:
                if self._place_follows:
                    self._place_follows = False
                    place = bytearray(PLACE.size)
                    self._io("receive from", self._channel.recv_into, place, self._timeout)
                    self.received_bytes += len(place)
                    number, offset = PLACE.unpack(place)
                    memory = self._peer_segment(number)
                    self._io("receive from", _t.copy_region, memory, offset, destination)
                else:
                    self._io("receive from", self._channel.recv_into, destination, self._timeout)
                    self.received_bytes += header.length
            except EndOfStream:
                raise ConnectionClosed(f"receive from {self.peer}: the peer left mid-message") from None

    def _peer_segment(self, number):
        """The peer's segment `number`, mapped (writable: it may expose regions in
        it); its fd was sent ahead of the frame, so it waits on the socket (or
        the peer is broken)."""
        deadline = time.monotonic() + self._timeout
        while number not in self._peer_segments:
            if len(self._peer_segments) >= MAX_SHARED_SEGMENTS:
                raise ProtocolError(f"receive from {self.peer}: more than {MAX_SHARED_SEGMENTS} shared segments")
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                raise ProtocolError(f"receive from {self.peer}: shared segment {number} was never sent")
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, SEGMENT.size, 1)
            except OSError as exc:
                raise TransportError(f"receive from {self.peer}: shared segment: {exc}") from None
            try:
                if not data:
                    raise EndOfStream(f"{self.peer} closed the connection")
                if len(data) != SEGMENT.size or len(fds) != 1:
                    raise ProtocolError(f"receive from {self.peer}: a malformed shared-segment announcement")
                got, size = SEGMENT.unpack(data)
                if got in self._peer_segments:
                    raise ProtocolError(f"receive from {self.peer}: shared segment {got} sent twice")
                if os.fstat(fds[0]).st_size != size or not size:
                    raise ProtocolError(f"receive from {self.peer}: shared segment {got} is not {size} bytes")
                if not fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
                    raise ProtocolError(f"receive from {self.peer}: shared segment {got} is not sealed "
                                        f"against shrinking")
                self._peer_segments[got] = mmap.mmap(fds[0], size, mmap.MAP_SHARED,
                                                     mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError) as exc:
                raise ProtocolError(f"receive from {self.peer}: shared segment: {exc}") from None
            finally:
                for fd in fds:
                    os.close(fd)
        return self._peer_segments[number]

    def shut(self):
        """End the connection both ways but keep the mapping and the socket: a
        native engine's threads may still be using them (close() after the
        engine's close())."""
        if os.getpid() != self._pid:
            return
        self._channel.shutdown()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

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
            for memory in self._peer_segments.values():
                memory.close()
            self._peer_segments.clear()
            self._sock.close()
