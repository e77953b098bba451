"""Shared memory between co-located peers: a layer over another transport
(TCP, or verbs) that moves a connection's bytes through memory both processes
map whenever the two ends run on the same host, and hands every other
connection to the transport underneath.

Who may use it.  Any local user can reach an abstract socket, so both sides
ask the kernel who is at the other end (SO_PEERCRED) before any memory
changes hands, and refuse a process of another uid unless
RDMAKV_SHM_ALLOW_UIDS names it.  The listener runs every set-up alongside
its other work, each with its own short deadline (SETUP_SECONDS) and within
caps per uid and in total, so a silent or slow local process costs others
nothing; refusals are logged within a budget.

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
direction (rdmakv/native/_shm.h): the sender copies header and payload in, the
receiver copies straight out into the destination buffer, in pieces, so a
large payload streams through a ring of any size.  Acquire/release counters,
futex sleeps only when a side has nothing to do, every wait bounded.

Shared results.  A listener also keeps an arena of memory files that the
server's round buffers are allocated from (allocate()), each after a 64-byte
control block.  A payload of at least SHARED_MIN_BYTES that lies in the arena
is not copied into the ring: the first time a connection needs a segment its
fd goes over the Unix socket, and the ring carries the header (flagged
SHARED_PAYLOAD, a bit only this layer uses and strips) and the payload's
place.  The receiver copies straight from the mapping into the destination,
so the server writes a sum once for all its co-located workers instead of
once into each worker's ring.  This is safe because the protocol already
keeps a round's result buffer unchanged until every worker has its copy
(rdmakv/server/summing.py).

Exposed regions.  The same buffers can be exposed to the peer under a tag
stream (expose(stream, buffers): a frame flagged EXPOSE carrying the places of
two buffers, which the peer maps writable); the peer finds them with
peer_regions(stream), writes a message's payload into one itself (guard()
words what goes wrong there as this connection's errors), and sends only the
header, flagged IN_PLACE; the receiver checks the stream was exposed, with
that size, and hands the header up flagged protocol.FLAG_IN_PLACE.  What is
written there, and under which lock, is the layer above's: the server's
shared sums (rdmakv/server/summing.py) use the control block before each
buffer.  This layer only moves places and checks them against the mapped
files.

The stream carries exactly what the TCP transport carries, so authentication,
the KVStore and the server run over it unchanged.  Once a link is handed to a
native engine (rdmakv/native/wire.c, worker_engine.c, server_engine.c), the
engine reads and writes the rings, maps the memory files and adds into the
sums itself, with the same frames and flags; ShmConnection then only sets the
link up, passes the server's memory files and builds the exposure frames
(exposure()).

Files: settings.py (whether to use it, from the environment), arena.py (the
shared round buffers), connection.py (one connection), listener.py (set-up,
both sides)."""
from rdmakv.transport.shm import listener
from rdmakv.transport.shm.settings import unavailable, wanted

__all__ = ["Layer", "over", "unavailable", "wanted"]


class Layer:
    """Shared memory over `inner` (a transport module): exports Listener and
    connect like every transport module."""

    def __init__(self, inner, forced=False):
        self.inner = inner
        self.forced = forced
        self.__name__ = f"rdmakv.transport.shm over {inner.__name__}"

    def Listener(self, host, port, timeout):   # noqa: N802 - the name every transport exports
        return listener.ShmListener(self.inner, self.forced, host, port, timeout)

    def connect(self, host, port, timeout, retry_until=None, native=False):
        connection = listener.connect(host, port, timeout, self.forced)
        if connection is not None:
            return connection
        return self.inner.connect(host, port, timeout, retry_until=retry_until, native=native)


def over(inner, forced=False):
    return Layer(inner, forced)
