"""The parameter server: sums each chunk over all workers and answers every
worker once all have pushed (RDMAKV_MODE=async: applies each push as it
arrives and answers its worker at once, server_engine.h).  `python -m rdmakv.server` runs a server or the
scheduler according to DMLC_ROLE, as `import byteps.server` does.

Memory per chunk is two result buffers used by alternate rounds (how a sum is
made in them: summing.py) plus, with an optimizer, the weights: bounded,
whatever the number of rounds.  In asynchronous mode it is the stored value
plus a reply buffer per worker.  A worker whose connection places data
remotely (verbs) also gets a slot per chunk that its pushes are written
straight into: the slot for round r+1 is offered once round r's push is summed.

Everything a worker's declaration makes the server keep is charged to a
memory budget (RDMAKV_SERVER_MEMORY, default this machine's memory) before it
is allocated: a declaration that does not fit is refused, naming the budget,
and keeps only the refusal.  A peer that has not connected makes us allocate nothing
beyond its small CONNECT; optimizer state is bounded by the keys declared."""
import heapq
import itertools
import logging
import math
import threading
import time

import numpy as np

from rdmakv.control import auth, hierarchy, trace
from rdmakv.control.engine_errors import engine_read_error, engine_stream_error
from rdmakv.control.node import ControlLink, accept_peers
from rdmakv.control.peer import Handler
from rdmakv.core import netif, partition, protocol
from rdmakv.core.compression import Compression, CompressionError
from rdmakv.core.config import Config, machine_memory
from rdmakv.core.errors import ConfigError, EndOfStream, PeerTimeout, ProtocolError, RdmaKVError
from rdmakv.core.protocol import FLAG_ACK, FLAG_BROADCAST, FLAG_NO_DATA, Op
from rdmakv.native import transport as _t
from rdmakv.server import summing
from rdmakv.transport import choose_transport, tcp

log = logging.getLogger("rdmakv.server")

MAX_DIMS = 32
DIRECT_REPLY_BYTES = 64 * 1024   # smaller replies go out from the summing thread when nothing waits
# Bookkeeping charged to the memory budget besides the buffers: what a key and
# each chunk held here cost in Python objects (about 0.9 and 1.7 KiB, measured
# by tests/test_allocation.py, which keeps these above the measurement).
KEY_COST = 2048
CHUNK_COST = 2048


def _human_bytes(nbytes):
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


class MemoryBudget:
    """The bytes this server has committed for declared keys, against its limit."""

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def charge(self, nbytes):
        """Take nbytes; False (taking nothing) if they do not fit."""
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes):
        with self._lock:
            self.used -= nbytes


class KeyRefused(ProtocolError):
    """A problem with one key: reported to the workers using it, the connection stays."""

    def __init__(self, key, message):
        super().__init__(message)
        self.key = key


class KeyState:
    __slots__ = ("key", "layout", "name", "declared_by", "disagreeing", "chunks", "error", "native", "compression")

    def __init__(self, key, layout):
        self.key = key
        self.layout = layout          # the declaration every worker must match
        self.name = layout["name"]
        self.compression = Compression.from_wire(layout["compression"])
        self.declared_by = set()      # ranks of the workers that declared it
        self.disagreeing = {}         # rank -> its declaration, where it differs from the first
        self.chunks = []              # the ChunkStates this server holds
        self.error = None             # set once workers disagree: the key is then refused
        self.native = None            # the key as the server's native engine knows it


class ChunkState:
    __slots__ = ("key_state", "index", "nbytes", "dtype_code", "dtype", "lock", "filled", "filling", "round",
                 "pushed", "opened", "has_data", "flags", "buffers", "_allocate", "regions", "weight", "native",
                 "snapshots", "rounds", "codec", "encoder", "pulled")

    def __init__(self, key_state, index, nbytes, dtype_code, allocate):
        self.key_state = key_state
        self.index = index
        self.nbytes = nbytes
        self.dtype_code = dtype_code
        self.dtype = np.dtype(protocol.DTYPE_NAMES[dtype_code])
        self.lock = threading.Lock()
        self.filled = threading.Condition(self.lock)
        self.filling = None           # rank of the worker whose push lands straight in this round's buffer
        self.round = 0
        self.pushed = set()
        self.opened = 0.0             # when the current round's first push arrived
        self.has_data = False
        self.flags = 0
        self.buffers = [None, None]
        self._allocate = allocate     # nbytes -> uint8 array, shared with co-located workers where possible
        self.regions = None           # the buffers' Regions, where they are sums co-located workers add into
        self.weight = None            # optimizer mode: the stored value
        self.native = None            # the chunk as the server's native engine knows it
        self.snapshots = None         # asynchronous mode: each worker's reply (buffers[0] is the stored value)
        self.rounds = None            # asynchronous mode, Python data path: each worker's next round
        self.codec = None             # a compressed chunk's Codec: pushpulls arrive encoded
        self.encoder = None           # where the codec compresses the pull: the sum's encoder (CodecState)
        self.pulled = None            # and, per round buffer, the encoded sum (Python data path)

    def push_limit(self, header):
        """The bytes a push of this chunk may carry: exactly its size, or, a compressed
        pushpull's, at most its codec's bound (RK_REFUSE_ENCODING's check is the decoder's)."""
        if header.flags & FLAG_NO_DATA:
            return 0, 0
        if self.codec is not None and not header.flags & FLAG_BROADCAST:
            return min(1, self.nbytes), self.codec.max_bytes(self.nbytes // 4)
        return self.nbytes, self.nbytes

    @property
    def stream(self):
        """The tag stream of this chunk's pushes."""
        return protocol.tag(Op.PUSH, self.key_state.key, self.index, 0).stream

    def buffer(self, rnd):
        slot = summing.round_buffer(rnd)
        if self.buffers[slot] is None:
            self.buffers[slot] = self._allocate(self.nbytes)
        return self.buffers[slot]


def unread_replies(worker, name, index, timeout):
    """Asynchronous mode: a worker pushed a chunk again but left our reply to its last
    push unread for RDMAKV_TIMEOUT (both data paths)."""
    return PeerTimeout(f"{worker} pushed key {name!r} chunk {index} again but left the reply to its previous "
                       f"push unread for {timeout:g} s (RDMAKV_TIMEOUT)")


class WorkerLink:
    """A worker connection: its receive scratch buffer and its reply queue,
    served highest priority first by a sender thread."""

    def __init__(self, peer, server):
        self.peer = peer
        self.server = server
        self.rank = None
        self.scratch = np.empty(0, np.uint8)
        self.filling = None           # the chunk this worker's push is landing in directly
        self.leaving_because = None   # what the worker said was wrong before it left
        self.places = peer.connection.features.places
        self.shares = peer.connection.features.shares
        self.slots = {}               # ChunkState -> where this worker's pushes land (when places)
        self._queue = []
        self._order = itertools.count()
        lock = threading.Lock()
        self._ready = threading.Condition(lock)   # the queue has work
        self._sent = threading.Condition(lock)    # a counted reply left
        self._unsent = {}             # asynchronous mode: ChunkState -> its replies not sent yet
        self._closed = False
        self._sending = False
        self._thread = threading.Thread(target=self._send_loop, daemon=True, name="rdmakv-reply")
        self._thread.start()

    def scratch_for(self, nbytes):
        if self.scratch.nbytes < nbytes:
            self.scratch = np.empty(nbytes, np.uint8)
        return self.scratch[:nbytes]

    def slot_for(self, chunk):
        slot = self.slots.get(chunk)
        if slot is None:
            slot = self.slots[chunk] = np.empty(chunk.nbytes, np.uint8)
        return slot

    def expose_sums(self, chunk):
        """Let a co-located worker add its pushes of chunk straight into the round buffers (summing.py)."""
        connection = self.peer.connection
        if chunk.regions is None or not self.shares:
            return
        native = self.server._native
        if native is None:
            connection.expose(chunk.stream, chunk.buffers)
            return
        # The engine writes the ring: the offer goes through it, after the segments' fds.
        header, offer, segments = connection.exposure(chunk.stream, chunk.buffers)
        for number in segments:
            native.link_has_segment(self.rank, number)
        code, err = native.send(self.rank, header, offer)
        if code:
            raise engine_stream_error(code, err, "send to", connection.peer, self.server.config.timeout)

    def offer_slot(self, chunk, rnd):
        """Let the worker write its push of round rnd straight into its slot (verbs); not a
        compressed chunk's, whose pushes are encodings of any size up to the codec's bound."""
        if self.places and chunk.codec is None:
            self.peer.offer(protocol.tag(Op.PUSH, chunk.key_state.key, chunk.index, rnd), self.slot_for(chunk))

    def reply(self, priority, op, payload, counted=None, **fields):
        """counted: the asynchronous chunk a RESULT answers (see wait_sent)."""
        if self.server._native is not None:     # the engine's reply thread owns the stream's order
            self._send_through_engine(priority, op, payload, fields)
            return
        with self._ready:
            if counted is not None:
                self._unsent[counted] = self._unsent.get(counted, 0) + 1
            small = (payload is None or memoryview(payload).nbytes <= DIRECT_REPLY_BYTES
                     or (self.shares and self.server.listener.region(payload) is not None))
            if self._queue or self._sending or not small:
                heapq.heappush(self._queue, (-priority, next(self._order), op, payload, counted, fields))
                self._ready.notify()
                return
            self._sending = True      # nothing waits: answer from this thread, skipping a hand-off
        self._transmit(priority, op, payload, counted, fields)

    def wait_sent(self, chunk, timeout):
        """Asynchronous mode, before taking this worker's push of chunk: wait until our
        replies to its earlier ones have left.  A worker waits for each reply before it
        pushes the chunk again, so only one that does not read them waits here (its
        reader only), and what it makes us hold stays one copy per chunk."""
        with self._sent:
            if not self._sent.wait_for(lambda: not self._unsent.get(chunk) or self._closed, timeout):
                raise unread_replies(self.peer.name, chunk.key_state.name, chunk.index, timeout)

    def _send_through_engine(self, priority, op, payload, fields):
        length = 0 if payload is None else memoryview(payload).nbytes
        code, err = self.server._native.send(self.rank, protocol.pack(op, length=length, priority=priority, **fields),
                                             payload)
        if code:
            connection = self.peer.connection
            log.warning("reply to %s failed: %s", self.peer.name,
                        engine_stream_error(code, err, "send to", connection.peer, self.server.config.timeout))
            connection.shut()

    def _transmit(self, priority, op, payload, counted, fields):
        try:
            self.peer.send(op, payload, priority=priority, **fields)
        except RdmaKVError as exc:
            log.warning("reply to %s failed: %s", self.peer.name, exc)
            self.peer.close()
        finally:
            with self._ready:
                self._sending = False
                if counted is not None:   # sent, or never will be
                    self._unsent[counted] -= 1
                    self._sent.notify_all()
                if self._queue:       # waking an idle reply thread would only cost a GIL hand-off
                    self._ready.notify()

    def _send_loop(self):
        while True:
            with self._ready:
                while (not self._queue or self._sending) and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                neg_priority, _, op, payload, counted, fields = heapq.heappop(self._queue)
                self._sending = True
            self._transmit(-neg_priority, op, payload, counted, fields)

    def close(self):
        with self._ready:
            self._closed = True
            self._ready.notify()
            self._sent.notify_all()
        self.peer.close()


class ParameterServer(Handler):
    def __init__(self, config=None, **overrides):
        self.config = config or Config.load(role="server", **overrides)
        self.transport, why = choose_transport(self.config.transport)
        host = netif.advertised_host(self.config)
        self.listener = self.transport.Listener(host, self.config.port, self.config.timeout)
        # Round buffers in memory the transport can share, where it can, so a result is
        # written once for all co-located workers (rdmakv/transport/shm/) instead of once
        # per connection, and co-located workers add their pushes into them (summing.py).
        self._allocate = self.listener.allocate
        self.address = netif.format_address(*self.listener.address)
        self.secret = auth.load_secret(self.config)
        if self.secret is None:
            log.warning("no RDMAKV_SECRET: this cluster is unauthenticated; anyone who can reach %s can push",
                        self.address)
        self.budget = MemoryBudget(self.config.server_memory or machine_memory())
        self.control = ControlLink(self.config, self.transport, "server", self._on_control, self._on_lost)
        self.rank = None
        self.num_workers = None
        self.num_servers = self.config.num_servers    # the scheduler's count, once joined
        self.tracer = None
        self.updater = None
        self._native = None           # the native data plane (server_engine.c), where the links allow it
        self._roots = {}              # one push per host: the local roots' hosts, by rank
        self._keys = {}
        self._first_key = None        # the first key declared with chunks here: its rounds number the traced steps
        self._chunks = {}
        self._links = {}              # worker rank -> WorkerLink
        self._departed = {}           # worker rank -> why it left; no round can complete after that
        self._native_departed = []    # links of departed workers whose descriptors the engine may still hold
        self._open_rounds = {}        # ChunkState -> round: rounds with some pushes but not all (see _watch)
        self._failure = None          # why the job failed, once it has
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._exit_code = 0
        log.info("server listening on %s (%s)", self.address, why)

    def run(self):
        """Serve until the scheduler says SHUTDOWN (returns 0) or the job fails (returns 1)."""
        base = getattr(self.transport, "inner", self.transport)     # shared memory's transport underneath
        # Verbs connections are streams the engine speaks under the same settings (verbs/stream.py).
        speaks_frames = base is tcp or base.__name__ == "rdmakv.transport.verbs"
        native = (self.config.engine == "native" and speaks_frames and not self.config.integrity
                  and not trace.enabled(self.config))
        welcome = self.control.join(*self.listener.address, node_id=self.config.server_id,
                                    hierarchy=hierarchy.refusal(self.config, native))
        self.rank, self.num_workers = welcome["rank"], welcome["num_workers"]
        self.num_servers = welcome["num_servers"]
        self._roots = dict(welcome.get("roots", ()))     # one push per host: the local roots, by rank
        self.tracer = trace.make(self.config, "server", self.rank)
        if native:
            self._native = _t.ServerEngine(self.num_workers, self.config.timeout, DIRECT_REPLY_BYTES)
            self._native.set_spin(self.config.spin_us / 1e6)
            for rank in welcome.get("via_host", ()):
                self._native.allow_via_host(rank)
            threading.Thread(target=self._hear_engine, daemon=True, name="rdmakv-engine-events").start()
        log.info("server %d: joined the job of %d workers (%s data path, %s mode)", self.rank, self.num_workers,
                 "native" if self._native is not None else "Python", self.config.mode)
        acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="rdmakv-accept")
        acceptor.start()
        threading.Thread(target=self._watch, daemon=True, name="rdmakv-watch").start()
        try:
            self._stopped.wait()
        finally:
            self.close()
        return self._exit_code

    def close(self):
        self._stopped.set()
        self.listener.close()
        self.control.close()
        if self._native is not None:
            self._native.close()      # joins its threads: the links' descriptors may be closed after
        with self._lock:
            links = list(self._links.values()) + self._native_departed
        for link in links:
            link.close()
            if self._native is not None:
                link.peer.connection.close()
        if self.tracer:
            self.tracer.write()

    def _accept_loop(self):
        accept_peers(self.listener, self, self.secret, self.config.timeout,
                     lambda: not self._stopped.is_set(), "worker", integrity=self.config.integrity)

    def _watch(self):
        """Tell the workers waiting on a round (in asynchronous mode, a broadcast) that
        has been open for half of RDMAKV_TIMEOUT whose pushes it still lacks, so that
        their timeout, if it comes, names the culprit and not only this server."""
        patience = self.config.timeout / 2
        while not self._stopped.wait(min(1.0, patience / 4)):
            if self._native is not None:
                for key, index, rounds in self._native.stale_rounds(patience):
                    self._tell_waiting(key, index, rounds)
                continue
            now = time.monotonic()
            for chunk, rnd in list(self._open_rounds.items()):
                with chunk.lock:
                    if chunk.round != rnd or not chunk.pushed:
                        self._open_rounds.pop(chunk, None)
                        continue
                    if now - chunk.opened < patience:
                        continue
                    self._open_rounds.pop(chunk, None)   # told once per round
                    # In asynchronous mode each worker's rounds are its own: its part was its last push.
                    rounds = {rank: rnd if chunk.rounds is None else chunk.rounds[rank] - 1 for rank in chunk.pushed}
                self._tell_waiting(chunk.key_state.key, chunk.index, rounds)

    def _tell_waiting(self, key, index, rounds):
        """rounds: {rank that pushed: the round its push belongs to}."""
        missing = [rank for rank in range(self.num_workers) if rank not in rounds]
        with self._lock:
            links = [(self._links[rank], rnd) for rank, rnd in rounds.items() if rank in self._links]
        notice = protocol.encode_json({"missing": missing})
        for link, rnd in links:
            link.reply(1 << 30, Op.WAITING, notice, key=key, chunk=index, round=rnd)

    # ---- the native engine's events --------------------------------------
    def _hear_engine(self):
        engine = self._native
        while True:
            event = engine.next_event(1.0)
            if event is None:
                if self._stopped.is_set():
                    return
                continue
            try:
                self._on_engine_event(*event)
            except Exception:     # a bug here must not leave the server deaf
                log.exception("server %s: handling an event of the native engine failed", self.rank)

    def _on_engine_event(self, rank, kind, code, err, limit, fields, payload):
        header = protocol.Header(*fields[2:])
        if kind == _t.EVENT_SUMMED:   # whether or not the worker whose push completed it is still here
            self._update_summed(header)
            return
        if kind == _t.EVENT_PUSHED:
            self._update_pushed(rank, header)
            return
        with self._lock:
            link = self._links.get(rank)
        state = self._keys.get(header.key)
        name = state.name if state is not None else header.key
        if kind == _t.EVENT_REFUSED and code != _t.REFUSE_UNDECLARED:
            self._fail_key(header.key, self._refusal(code, limit, header, rank, name))
            return
        if link is None:              # it left meanwhile
            if kind == _t.EVENT_MESSAGE:
                self._native.answer(rank, _t.VERDICT_STOP)
            return
        peer = link.peer
        if kind == _t.EVENT_MESSAGE:
            self._take_handed_message(rank, peer, header, payload)
        elif kind == _t.EVENT_REFUSED:
            peer.ended(ProtocolError(f"worker {rank} pushed key {name!r} without declaring it"))
        elif kind == _t.EVENT_SEND_FAILED:
            log.warning("reply to %s failed: %s", peer.name,
                        engine_stream_error(code, err, "send to", peer.connection.peer, self.config.timeout))
            peer.connection.shut()
        elif code == _t.ERR_UNREAD:
            peer.ended(unread_replies(peer.name, name, header.chunk, self.config.timeout))
        else:
            peer.ended(engine_read_error(code, err, limit, fields, peer.name, peer.connection.peer,
                                         self.config.timeout))

    def _take_handed_message(self, rank, peer, header, payload):
        """A message the engine leaves to us (control, or a push it cannot place):
        handled here (its payload read here too, unless the engine read it) while
        the engine's reader waits for the verdict."""
        try:
            peer.receive(header, arrived=payload)
        except Exception as exc:      # noqa: BLE001 - whatever it was, this worker's link is over
            if not isinstance(exc, RdmaKVError):
                log.exception("server %s: handling a message from %s failed", self.rank, peer.name)
            self._native.answer(rank, _t.VERDICT_STOP)
            peer.ended(exc)
            return
        self._native.answer(rank, _t.VERDICT_CONTINUE)

    def _refusal(self, code, limit, header, rank, name):
        """What a push the engine refused is told (server_engine.h, enum rk_refusal)."""
        if code == _t.REFUSE_KEY_FAILED:
            return self._keys[header.key].error
        if code == _t.REFUSE_DEPARTED:
            return self._departure_message(next(iter(self._departed)), header.key)
        if code == _t.REFUSE_DTYPE:
            return (f"worker {rank} pushed key {name!r} as {protocol.DTYPE_NAMES.get(header.dtype)}, "
                    f"declared {protocol.DTYPE_NAMES.get(limit)}")
        if code == _t.REFUSE_ROUND:
            return f"worker {rank} pushed round {header.round} of key {name!r}, the server is at round {limit}"
        if code == _t.REFUSE_TWICE:
            return f"worker {rank} pushed key {name!r} chunk {header.chunk} twice in round {header.round}"
        if code == _t.REFUSE_MIXED:
            return f"workers mix broadcast and pushpull on key {name!r} in round {header.round}"
        if code == _t.REFUSE_TWO_ROOTS:
            return (f"more than one worker sent the root value for the broadcast of key {name!r}: the workers "
                    f"disagree on the root")
        if code == _t.REFUSE_SUM_STALLED:
            return self._sum_stalled(name, header.chunk, rank)
        if code == _t.REFUSE_ENCODING:
            return self._not_an_encoding(name, header, rank)
        if code == _t.REFUSE_BROADCAST_OPEN:
            return self._broadcast_open(name, rank)
        return f"no worker sent the root value for the broadcast of key {name!r}: the root rank is not a worker"

    def _update_summed(self, header):
        """A round the engine summed, with an optimizer set: update the weight, answer with it."""
        chunk = self._chunks[(header.key, header.chunk)]
        result = chunk.buffer(header.round)
        if self.updater is not None and chunk.weight is not None:
            try:
                self.updater.update(chunk.key_state.name, chunk.index, chunk.weight.view(chunk.dtype),
                                    result.view(chunk.dtype))
            except Exception as exc:  # noqa: BLE001 - whatever failed, the workers must hear it, not time out
                log.exception("server %s: the optimizer failed on key %r", self.rank, chunk.key_state.name)
                self._fail_key(header.key, f"server {self.rank}: the optimizer failed on key "
                                           f"{chunk.key_state.name!r}: {type(exc).__name__}: {exc}")
                return
            result = chunk.weight
        self._native.reply_all(chunk.native, header.round, header.priority, result)

    def _update_pushed(self, rank, header):
        """Asynchronous mode with an optimizer: apply worker rank's push (in its snapshot)
        to the stored value, and answer it with the value then (server_engine.h)."""
        chunk = self._chunks[(header.key, header.chunk)]
        stored = chunk.buffers[0]
        snapshot = chunk.snapshots[rank * chunk.nbytes:(rank + 1) * chunk.nbytes]
        failure = None
        self._native.hold(chunk.native)
        try:
            if self.updater is not None and not header.flags & FLAG_NO_DATA:
                self.updater.update(chunk.key_state.name, chunk.index, stored.view(chunk.dtype),
                                    snapshot.view(chunk.dtype))
            snapshot[:] = stored
        except Exception as exc:  # noqa: BLE001 - whatever failed, the workers must hear it, not time out
            log.exception("server %s: the optimizer failed on key %r", self.rank, chunk.key_state.name)
            failure = exc
        finally:
            self._native.release(chunk.native)
        if failure is not None:
            self._fail_key(header.key, f"server {self.rank}: the optimizer failed on key "
                                       f"{chunk.key_state.name!r}: {type(failure).__name__}: {failure}")
            return
        self._native.reply_one(chunk.native, rank, header.round, header.priority)

    # ---- scheduler messages ----------------------------------------------
    def _on_control(self, header, obj):
        if header.op == Op.SHUTDOWN:
            log.info("server %d: shutdown", self.rank)
            try:
                # The scheduler counts a server's leaving as orderly only once it heard this.
                self.control.send(Op.GOODBYE)
            except RdmaKVError as exc:
                log.warning("server %d: could not say goodbye to the scheduler: %s", self.rank, exc)
            self._stopped.set()
        elif header.op == Op.ERROR:
            self._job_failed(f"the scheduler reports: {protocol.peer_text(obj, default='the job failed')}")

    def _on_lost(self, error):
        self._job_failed(f"server {self.rank} lost the scheduler ({error})")

    def _job_failed(self, reason):
        """Pass the real cause on to every worker before our connections close, or
        they would only learn that this server went away (or that a worker left)."""
        log.error("server %s: job failed: %s", self.rank, reason)
        with self._lock:
            self._failure = self._failure or reason
            links = list(self._links.values())
        notice = protocol.encode_json({"message": self._failure, "fatal": True})
        for link in links:
            try:
                if self._native is not None:      # the engine's reply thread shares the stream
                    link.reply(1 << 30, Op.ERROR, notice)
                else:
                    link.peer.send(Op.ERROR, notice)
            except RdmaKVError:
                pass
        self._exit_code = 1
        self._stopped.set()

    # ---- worker messages -------------------------------------------------
    introduction = "CONNECT"

    def introduced(self, peer):
        return "link" in peer.info

    def destination(self, peer, header):
        link = peer.info.get("link")
        if link is None:
            # Nothing is allocated for a peer that has not connected but its small CONNECT.
            if header.op != Op.CONNECT:
                raise ProtocolError(f"expected CONNECT, got {protocol.op_name(header.op)} "
                                    f"of {header.length} bytes")
            if header.length > protocol.MAX_CONNECT_BYTES:
                raise ProtocolError(f"CONNECT of {header.length} bytes exceeds {protocol.MAX_CONNECT_BYTES}")
            return None
        if header.op == Op.PUSH or header.op == Op.INIT:
            chunk = self._chunks.get((header.key, header.chunk))
            if chunk is not None:
                lowest, highest = chunk.push_limit(header) if header.op == Op.PUSH else (chunk.nbytes, chunk.nbytes)
            if chunk is None or not lowest <= header.length <= highest:
                # A refused key (a worker whose layout differs from the first one's,
                # or one that did not fit): its pushes are taken in (within what the
                # worker declared) and refused, and the connection kept for its other keys.
                if self._refused_chunk_bytes(link, header) is not None:
                    return link.scratch_for(header.length)
                if chunk is None:
                    raise ProtocolError(f"{protocol.op_name(header.op)} for undeclared key {header.key} "
                                        f"chunk {header.chunk}")
                raise ProtocolError(f"{protocol.op_name(header.op)} of {header.length} bytes for key "
                                    f"{chunk.key_state.name!r} chunk {chunk.index} from worker {link.rank}, "
                                    f"declared {chunk.nbytes}"
                                    + (f" ({chunk.key_state.compression.kind}: at most {highest} bytes encoded)"
                                       if highest != chunk.nbytes else ""))
            if header.op == Op.PUSH and link.places and chunk.codec is None:
                return link.slot_for(chunk)
            if (header.op == Op.PUSH and chunk.regions is None and chunk.snapshots is None
                    and self._native is None and chunk.codec is None):
                # The round's first contribution lands straight in its result buffer;
                # later ones land in the connection's scratch buffer and are added.
                # (Shared sums take pushes from co-located workers ready-summed.)
                with chunk.lock:
                    if (header.round == chunk.round and not chunk.has_data and chunk.filling is None
                            and link.rank not in chunk.pushed and chunk.key_state.error is None):
                        chunk.filling = link.rank
                        link.filling = chunk
                        return chunk.buffer(chunk.round)
            return link.scratch_for(header.length)
        if header.op == Op.SET_STATES:
            with self._lock:
                chunks = list(self._chunks.values())
            limit = protocol.state_limit(sum(c.nbytes for c in chunks), len(chunks))
            if header.length > limit:
                raise ProtocolError(f"optimizer state of {header.length} bytes exceeds {limit}, the most the "
                                    f"{len(chunks)} chunks declared on server {self.rank} can have")
            return bytearray(header.length)
        return None

    def _refused_chunk_bytes(self, link, header):
        """header.length if the key was refused (the workers disagree on it, or it
        did not fit) and `link`'s own declaration of it has that chunk, of that
        size, on this server: the push is taken in and refused, not the
        connection (the worker may push before the refusal reaches it); else None."""
        state = self._keys.get(header.key)
        if state is None or link is None or state.error is None:
            return None
        declared = state.disagreeing.get(link.rank)
        if declared is None and link.rank in state.declared_by:
            declared = state.layout
        if declared is None:
            return None
        nbytes = math.prod(declared["shape"]) * np.dtype(declared["dtype"]).itemsize
        size = declared["chunk_bytes"]
        if (header.chunk >= partition.chunk_count(nbytes, size)
                or partition.server_of(header.key, header.chunk, self.num_servers) != self.rank):
            return None
        _, chunk_bytes = partition.piece(nbytes, size, header.chunk)
        return chunk_bytes if chunk_bytes == header.length else None

    def on_message(self, peer, header, payload):
        link = peer.info.get("link")
        if link is None:
            if header.op != Op.CONNECT:
                raise ProtocolError(f"expected CONNECT, got {protocol.op_name(header.op)}")
            self._connect(peer, protocol.decode_json(payload or b""))
            return
        try:
            if header.op == Op.PUSH:
                self._push(link, header, payload)
            elif header.op == Op.DECLARE:
                self._declare(link, protocol.decode_json(payload or b""))
            elif header.op == Op.INIT:
                self._init_value(link, header, payload)
            elif header.op in (Op.SET_OPTIMIZER, Op.GET_STATES, Op.SET_STATES):
                self._optimizer_op(link, header, payload)
            elif header.op == Op.ERROR:      # the worker is leaving because the job failed: why
                link.leaving_because = protocol.peer_text(protocol.decode_json(payload or b""), default="")
            else:
                raise ProtocolError(f"unexpected {protocol.op_name(header.op)} from {peer.name}")
        except KeyRefused as exc:
            self._fail_key(exc.key, str(exc))

    def _connect(self, peer, obj):
        rank = obj.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.num_workers:
            raise ProtocolError(f"CONNECT with invalid worker rank {rank!r}")
        with self._lock:
            if rank in self._links:
                raise ProtocolError(f"worker {rank} is already connected")
            link = peer.info["link"] = WorkerLink(peer, self)
            link.rank = rank
            self._links[rank] = link
        peer.name = hierarchy.worker_name(rank, self._roots)
        if self._native is not None:
            if not peer.connection.features.plain_frames:
                raise ProtocolError(f"worker {rank} runs the Python data path over its connection "
                                    f"({type(peer.connection).__name__}), which this server's native engine "
                                    f"cannot: set RDMAKV_ENGINE, RDMAKV_INTEGRITY and RDMAKV_TRACE_DIR alike "
                                    f"on every node")
            # Set first: the engine may hand a message over before this returns.
            peer.connection.read_ahead = lambda view: self._native.take_buffered(rank, view)
            self._native.start_link(rank, *peer.connection.engine_stream())   # raises: the Peer ends the link
            peer.hand_off()           # from its next message on, the engine reads this worker

    def on_closed(self, peer, error):
        link = peer.info.get("link")
        if link is None:
            return
        chunk = link.filling
        if chunk is not None:
            with chunk.lock:
                self._end_fill(link)
        link.close()
        with self._lock:
            if self._links.get(link.rank) is not link:
                return
            del self._links[link.rank]
            self._departed.setdefault(link.rank, link.leaving_because or (
                "closed its connection" if error is None or isinstance(error, EndOfStream) else str(error)))
            if self._native is not None:
                self._native.departed()
                self._native_departed.append(link)
                broken = {key for key, state in self._keys.items()
                          if state.native is not None and self._native.key_has_pushes(state.native)}
            else:
                broken = {key for (key, _), chunk in self._chunks.items() if chunk.pushed}
        if error is not None and not self._stopped.is_set() and not isinstance(error, EndOfStream):
            log.warning("server %s: %s left: %s", self.rank, peer.name, error)
        # Rounds that were waiting for it can never complete: fail them now, not after a timeout.
        for key in broken:
            self._fail_key(key, self._departure_message(link.rank, key))

    def _departure_message(self, rank, key):
        if self._failure:             # the worker left because the job failed: say why
            return self._failure
        state = self._keys.get(key)
        name = state.name if state else key
        return (f"{hierarchy.worker_name(rank, self._roots)} left the job ({self._departed[rank]}), so key {name!r} "
                f"can no longer be summed")

    # ---- declarations ----------------------------------------------------
    def _declare(self, link, layout):
        key = layout.get("key")
        if not isinstance(key, int):
            raise ProtocolError("DECLARE without an integer key")
        self._validate_layout(key, layout)
        declared, here = self._resolve(layout)
        with self._lock:
            state = self._keys.get(key)
        if state is None:
            state = self._add_key(key, declared, here)
        with self._lock:
            if self._keys.get(key) is not state:    # refused, and not even the refusal fits the budget
                link.reply(1 << 30, Op.ERROR, protocol.encode_json({"message": state.error, "key": key}), key=key)
                return
            state.declared_by.add(link.rank)
            if state.native is not None:
                self._native.declared_by(state.native, link.rank)
            if state.layout != declared:
                # Only this key is refused; the worker's pushes of it are still read off its
                # connection (within what it declared), which stays up for its other keys.
                state.disagreeing[link.rank] = declared
                if state.error is None:
                    state.error = self._describe_mismatch(state, declared, link.rank)
        if state.error is None and link.places and not self.budget.charge(sum(c.nbytes for c in state.chunks)):
            self._fail_key(key, self._over_budget(f"worker {link.rank}'s landing slots for key {state.name!r} "
                                                  f"need {_human_bytes(sum(c.nbytes for c in state.chunks))}"))
        if state.error is not None:
            self._fail_key(key, state.error)
            return
        for chunk in state.chunks:
            with chunk.lock:
                rnd = chunk.round     # 0: no round completes before this worker pushes
            link.offer_slot(chunk, rnd)
            link.expose_sums(chunk)

    def _resolve(self, layout):
        """(what workers must agree on, the chunks this server holds) for a valid DECLARE:
        the chunks and their placement follow from it (rdmakv.partition, the
        same functions the workers use), so two workers agree when their
        declarations do, however they were configured."""
        itemsize = np.dtype(layout["dtype"]).itemsize
        pieces = partition.pieces(math.prod(layout["shape"]) * itemsize, layout["chunk_bytes"])
        placed = partition.place(layout["key"], pieces, self.num_servers)
        declared = {"name": layout["name"], "dtype": layout["dtype"], "shape": layout["shape"],
                    "chunk_bytes": layout["chunk_bytes"], "compression": layout.get("compression")}
        return declared, [chunk for chunk in placed if chunk.server == self.rank]

    def _add_key(self, key, declared, here):
        """Record a new key, its chunks here allocated within the memory budget
        (or, if they do not fit, its refusal); returns the key's KeyState, which
        another worker's declaration may have recorded meanwhile."""
        # Two round buffers per chunk; in asynchronous mode, the stored value and a reply per worker.
        copies = 1 + self.num_workers if self.config.mode == "async" else 2
        state = KeyState(key, declared)
        # A compressed chunk's link scratch may grow to its codec's bound, and an
        # encoded sum per round buffer where the pull is compressed too.
        codecs = [state.compression.for_server().codec(chunk.nbytes // 4) if state.compression.active else None
                  for chunk in here]
        cost = KEY_COST + sum(CHUNK_COST + copies * chunk.nbytes for chunk in here) + sum(
            codec.max_bytes(chunk.nbytes // 4) * (3 if codec.compresses_pull else 1)
            for codec, chunk in zip(codecs, here) if codec is not None)
        if self.budget.charge(cost):
            try:
                self._allocate_chunks(state, here, codecs)
            except OSError as exc:        # out of memory or descriptors: keep only the refusal
                state.chunks = []
                state.error = f"server {self.rank} could not allocate key {state.name!r} ({_human_bytes(cost)}): {exc}"
                self.budget.release(cost - KEY_COST)
                cost = KEY_COST
        else:
            state.error = self._over_budget(f"key {state.name!r} needs {_human_bytes(cost)} ({len(here)} chunks there, "
                                            f"{copies} buffers each)")
            cost = KEY_COST if self.budget.charge(KEY_COST) else 0
            if not cost:
                return state              # not recorded: the caller tells this worker only
        with self._lock:
            existing = self._keys.get(key)
            if existing is None:
                if self._native is not None:
                    self._declare_natively(state)
                self._keys[key] = state
                for chunk in state.chunks:
                    self._chunks[(key, chunk.index)] = chunk
                if self._first_key is None and state.chunks:
                    self._first_key = key
                return state
        self.budget.release(cost)    # another worker's declaration won the race
        return existing

    def _declare_natively(self, state):
        """Let the engine sum the key's chunks held here (in their round buffers)."""
        state.native = self._native.add_key(state.key)
        if state.error is not None:
            self._native.refuse_key(state.native)
        for chunk in state.chunks:
            if chunk.snapshots is not None:
                chunk.native = self._native.add_async_chunk(state.native, chunk.index, chunk.dtype_code,
                                                            chunk.buffers[0], chunk.snapshots)
                continue
            places = [(r.number, r.offset) for r in chunk.regions] if chunk.regions is not None else None
            chunk.native = self._native.add_chunk(state.native, chunk.index, chunk.dtype_code, chunk.buffer(0),
                                                  chunk.buffer(1), places)
            if chunk.codec is not None:
                self._native.set_codec(chunk.native, chunk.codec)

    def _over_budget(self, need):
        return (f"{need} of server {self.rank}'s memory, but {_human_bytes(self.budget.used)} of its "
                f"{_human_bytes(self.budget.limit)} budget (RDMAKV_SERVER_MEMORY) is already committed: "
                f"set RDMAKV_SERVER_MEMORY higher on the servers, or add servers")

    def _allocate_chunks(self, state, here, codecs):
        code = protocol.DTYPE_CODES[state.layout["dtype"]]
        for piece, codec in zip(here, codecs):
            chunk = ChunkState(state, piece.index, piece.nbytes, code, self._allocate)
            state.chunks.append(chunk)
            if codec is not None:
                # Private sums: an encoded push is decoded into the sum by the server, never
                # added in place by a co-located worker (summing.py).
                chunk.codec = codec
                if codec.compresses_pull:
                    chunk.encoder = _t.CodecState(codec, piece.nbytes // 4, piece.index)
                continue
            if self.config.mode == "async":
                # Private memory, not sums co-located workers add into: a push must be
                # answered with the value right after it, which only the server can copy
                # under the chunk's lock (server_engine.h); replies cross as bytes.
                chunk.buffers[0] = np.zeros(piece.nbytes, np.uint8)
                chunk.snapshots = np.empty(piece.nbytes * self.num_workers, np.uint8)
                chunk.rounds = [0] * self.num_workers
                continue
            regions = [self.listener.region(chunk.buffer(rnd)) for rnd in (0, 1)]
            if None not in regions:
                chunk.regions = regions

    def _validate_layout(self, key, layout):
        """Check a declaration's fields, before anything is computed from them."""
        name, dtype, shape, chunk_bytes = (layout.get(f) for f in ("name", "dtype", "shape", "chunk_bytes"))
        problem = None
        if not {"key", "name", "dtype", "shape", "chunk_bytes"} <= set(layout) <= {
                "key", "name", "dtype", "shape", "chunk_bytes", "compression"}:
            problem = f"fields {sorted(map(str, layout))}"
        elif layout["key"] != key or not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < 1 << 64:
            problem = f"a key that is not {key!r}, or not a wire key"
        elif not isinstance(name, str) or len(name) > 1024:
            problem = "a missing or over-long name"
        elif not isinstance(dtype, str) or dtype not in protocol.DTYPE_CODES:   # a list is unhashable
            problem = f"unsupported dtype {dtype!r}"
        elif (not isinstance(shape, list) or len(shape) > MAX_DIMS
              or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
              or math.prod(shape) > protocol.MAX_CHUNK_BYTES * protocol.MAX_KEY_CHUNKS):  # Python ints: exact
            problem = f"invalid shape {shape!r}"
        else:
            itemsize = np.dtype(dtype).itemsize
            nbytes = math.prod(shape) * itemsize
            if (not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool)
                    or (chunk_bytes != 0 if nbytes == 0 else
                        not 0 < chunk_bytes <= protocol.MAX_CHUNK_BYTES or chunk_bytes % itemsize)):
                problem = f"chunks of {chunk_bytes!r} bytes"
            elif partition.chunk_count(nbytes, chunk_bytes) > protocol.MAX_KEY_CHUNKS:
                problem = (f"{partition.chunk_count(nbytes, chunk_bytes)} chunks (a key may have at most "
                           f"{protocol.MAX_KEY_CHUNKS})")
            else:
                problem = self._compression_problem(layout.get("compression"), dtype)
        if problem:
            raise ProtocolError(f"DECLARE of key {name!r} ({key}) has {problem}")

    def _compression_problem(self, wire, dtype):
        """What is wrong with a declaration's compression, or None."""
        try:
            compression = Compression.from_wire(wire)
            if compression.active:
                if dtype != "float32":
                    return f"compression {compression.kind!r} of a {dtype} key (float32 only)"
                if self.config.mode == "async":
                    return f"compression {compression.kind!r} in asynchronous mode"
                compression.codec(1)      # implemented by this build
        except (CompressionError, ValueError) as exc:
            return f"compression that cannot be used: {exc}"
        return None

    @staticmethod
    def _describe_mismatch(state, layout, rank):
        first = state.layout
        if first["name"] != layout["name"]:
            return (f"keys {first['name']!r} and {layout['name']!r} hash to the same wire key {state.key}; "
                    f"rename one of them")
        for field in ("dtype", "shape", "compression"):
            if first[field] != layout[field]:
                return (f"workers disagree on key {first['name']!r}: {field} {first[field]} "
                        f"(first declaration) vs {layout[field]} (worker {rank})")
        # The rest follows from chunk_bytes: placement is a function of the key (partition.place).
        return (f"workers cut key {first['name']!r} into chunks of {first['chunk_bytes']} bytes (first "
                f"declaration) and {layout['chunk_bytes']} (worker {rank}): set RDMAKV_PARTITION_BYTES "
                f"alike on every worker")

    def _fail_key(self, key, message):
        with self._lock:
            state = self._keys.get(key)
            if state is not None and state.error is None:
                state.error = message
            if state is not None and state.native is not None:
                self._native.refuse_key(state.native)
            ranks = sorted(state.declared_by) if state else []
            links = [self._links[r] for r in ranks if r in self._links]
        log.warning("server %s: key %s refused: %s", self.rank, key, message)
        for link in links:
            link.reply(1 << 30, Op.ERROR, protocol.encode_json({"message": message, "key": key}), key=key)

    # ---- tensor data -----------------------------------------------------
    def _chunk(self, link, header):
        chunk = self._chunks.get((header.key, header.chunk))
        if chunk is None:
            if self._refused_chunk_bytes(link, header) is not None:
                raise KeyRefused(header.key, self._keys[header.key].error)
            raise ProtocolError(f"{protocol.op_name(header.op)} for undeclared key {header.key} "
                                f"chunk {header.chunk}")
        if chunk.key_state.error is not None:
            raise KeyRefused(header.key, chunk.key_state.error)
        return chunk

    def _push(self, link, header, payload):
        if header.flags & protocol.FLAG_VIA_HOST:
            raise ProtocolError(f"{link.peer.name} pushed key {header.key} chunk {header.chunk} through its "
                                f"host's root (one push per host), which this server's Python data path does not "
                                f"take: set RDMAKV_ENGINE, RDMAKV_INTEGRITY and RDMAKV_TRACE_DIR alike on every node")
        chunk = self._chunks.get((header.key, header.chunk))
        if chunk is None:
            if self._refused_chunk_bytes(link, header) is not None:
                raise KeyRefused(header.key, self._keys[header.key].error)
            raise ProtocolError(f"PUSH for undeclared key {header.key} chunk {header.chunk}")
        name = chunk.key_state.name
        no_data = header.flags & FLAG_NO_DATA
        summed = header.flags & protocol.FLAG_IN_PLACE   # the worker added it into its sum itself (summing.py)
        if summed and (header.flags & ~(FLAG_ACK | protocol.FLAG_IN_PLACE) or chunk.regions is None):
            raise ProtocolError(f"receive from {link.peer.connection.peer}: a push of key {header.key} chunk "
                                f"{header.chunk} summed in place without an offer for it")
        if chunk.snapshots is not None:
            self._push_async(link, chunk, header, payload)
            return
        if self.tracer:
            if chunk.key_state.key == self._first_key:    # a round of the first key held here: a new step
                self.tracer.begin_step(header.round)
            self.tracer.stage("push", key=name, chunk=chunk.index, priority=header.priority,
                                round=header.round, worker=link.rank)
        with chunk.lock:
            # Held from here until the contribution is counted, so that an adder
            # waiting for a direct fill never sees the buffer before it is marked full.
            direct = link.filling is chunk
            if direct:
                self._end_fill(link)
            self._check_push(chunk, link, header, no_data, chunk.round, departed_refuses=True)
            if link.rank in chunk.pushed:
                raise KeyRefused(header.key, f"worker {link.rank} pushed key {name!r} chunk {chunk.index} "
                                            f"twice in round {chunk.round}")
            broadcast = header.flags & FLAG_BROADCAST
            if not chunk.pushed:
                chunk.opened = time.monotonic()
                self._open_rounds[chunk] = chunk.round
            elif broadcast != chunk.flags & FLAG_BROADCAST:
                raise KeyRefused(header.key, f"workers mix broadcast and pushpull on key {name!r} "
                                            f"in round {chunk.round}")
            target = chunk.buffer(chunk.round)
            if not no_data:
                if (not direct and chunk.filling is not None
                        and not chunk.filled.wait_for(lambda: chunk.filling is None, self.config.timeout)):
                    raise KeyRefused(header.key, f"worker {chunk.filling} stalled while pushing key {name!r}")
                if chunk.has_data and broadcast:
                    raise KeyRefused(header.key, f"more than one worker sent the root value for the "
                                                f"broadcast of key {name!r}: the workers disagree on the root")
                if chunk.regions is not None:
                    if not summed:
                        self._sum_shared(chunk, payload, link, name)
                elif chunk.codec is not None and not broadcast:
                    if chunk.nbytes and not summing.add_encoded(target, payload, chunk.codec,
                                                                first=not chunk.has_data):
                        raise KeyRefused(header.key, self._not_an_encoding(name, header, link.rank))
                elif chunk.nbytes and not (direct and not chunk.has_data):   # a direct fill is in place
                    summing.add(target, payload, chunk.dtype_code, first=not chunk.has_data)
                chunk.has_data = True
            chunk.flags = header.flags
            chunk.pushed.add(link.rank)
            complete = len(chunk.pushed) == self.num_workers
            if complete:
                if not chunk.has_data:
                    raise KeyRefused(header.key, f"no worker sent the root value for the broadcast of key "
                                                f"{name!r}: the root rank is not a worker")
                result = target
                if self.updater is not None and chunk.weight is not None and not broadcast:
                    self.updater.update(name, chunk.index, chunk.weight.view(chunk.dtype),
                                        target.view(chunk.dtype))
                    result = chunk.weight
                if chunk.encoder is not None and not broadcast:
                    result = summing.encode_sum(chunk, result)   # the sum, or the weight, as the pull takes it
                rnd = chunk.round
                if self.tracer:
                    self.tracer.stage("summed", key=name, chunk=chunk.index, round=rnd, priority=header.priority)
                chunk.round += 1
                chunk.pushed = set()
                self._open_rounds.pop(chunk, None)
                chunk.has_data = False
                with self._lock:
                    links = list(self._links.values())
        # Before the result goes out, so the worker has it when it pushes the next round.
        link.offer_slot(chunk, header.round + 1)
        if not complete:
            if header.flags & FLAG_ACK:
                link.reply(1 << 30, Op.RECEIVED, None, key=header.key, chunk=chunk.index, round=header.round)
            return
        for other in links:
            other.reply(header.priority, Op.RESULT, result, key=header.key, chunk=chunk.index, round=rnd,
                        dtype=chunk.dtype_code)

    def _check_push(self, chunk, link, header, no_data, expected_round, departed_refuses):
        """What every push must be, checked under its chunk's lock (both modes): else
        KeyRefused (the key's workers are told) or ProtocolError (the link ends)."""
        name = chunk.key_state.name
        if chunk.key_state.error is not None:
            raise KeyRefused(header.key, chunk.key_state.error)
        if departed_refuses and self._departed:
            raise KeyRefused(header.key, self._departure_message(next(iter(self._departed)), header.key))
        if link.rank not in chunk.key_state.declared_by:
            raise ProtocolError(f"worker {link.rank} pushed key {name!r} without declaring it")
        if header.dtype != chunk.dtype_code:
            raise KeyRefused(header.key, f"worker {link.rank} pushed key {name!r} as "
                                        f"{protocol.DTYPE_NAMES.get(header.dtype)}, declared {chunk.dtype}")
        lowest, highest = chunk.push_limit(header)
        if not lowest <= header.length <= highest:
            raise ProtocolError(f"PUSH of key {name!r} chunk {chunk.index} from worker {link.rank} has "
                                f"{header.length} bytes")
        if header.round != expected_round:
            raise KeyRefused(header.key, f"worker {link.rank} pushed round {header.round} of key {name!r}, "
                                        f"the server is at round {expected_round}")

    def _push_async(self, link, chunk, header, payload):
        """Asynchronous mode on the Python data path (server_engine.c's take_async_push):
        apply the push to the stored value (through the optimizer, if one is set), or
        count a broadcast's part, and answer with a copy of the value then."""
        name = chunk.key_state.name
        no_data = header.flags & FLAG_NO_DATA
        broadcast = header.flags & FLAG_BROADCAST
        stored = chunk.buffers[0]
        answers = []                  # (link, round, the value it gets)
        link.wait_sent(chunk, self.config.timeout)
        with chunk.lock:
            # A departed worker stops only broadcasts, the one step that waits for everyone.
            self._check_push(chunk, link, header, no_data, chunk.rounds[link.rank], departed_refuses=broadcast)
            if link.rank in chunk.pushed:
                raise KeyRefused(header.key, f"worker {link.rank} pushed key {name!r} chunk {chunk.index} twice "
                                            f"in round {header.round}" if broadcast
                                 else self._broadcast_open(name, link.rank))
            if broadcast and not no_data and chunk.has_data:
                raise KeyRefused(header.key, f"more than one worker sent the root value for the "
                                            f"broadcast of key {name!r}: the workers disagree on the root")
            chunk.rounds[link.rank] += 1
            if not broadcast:
                if self.updater is not None:
                    if not no_data:
                        self.updater.update(name, chunk.index, stored.view(chunk.dtype),
                                            np.frombuffer(payload, chunk.dtype))
                elif not no_data and chunk.nbytes:
                    summing.add(stored, payload, chunk.dtype_code, first=False)
                answers.append((link, header.round, stored.copy()))   # the value right after this push
            else:
                if not no_data:
                    if chunk.nbytes:
                        stored[:] = payload
                    chunk.has_data = True
                if not chunk.pushed:
                    chunk.opened = time.monotonic()
                    self._open_rounds[chunk] = chunk.round
                chunk.pushed.add(link.rank)
                if len(chunk.pushed) == self.num_workers:
                    chunk.pushed = set()
                    self._open_rounds.pop(chunk, None)
                    if not chunk.has_data:
                        raise KeyRefused(header.key, f"no worker sent the root value for the broadcast of key "
                                                    f"{name!r}: the root rank is not a worker")
                    chunk.has_data = False
                    with self._lock:
                        links = list(self._links.values())
                    value = stored.copy()
                    answers = [(other, chunk.rounds[other.rank] - 1, value) for other in links]
        link.offer_slot(chunk, header.round + 1)
        for other, rnd, value in answers:
            other.reply(header.priority, Op.RESULT, value, counted=chunk, key=header.key, chunk=chunk.index,
                        round=rnd, dtype=chunk.dtype_code)

    def _sum_shared(self, chunk, payload, link, name):
        """Add a push that reached us through the connection into a sum that
        co-located workers add into too (the caller holds chunk.lock)."""
        try:
            summing.contribute(chunk.regions[summing.round_buffer(chunk.round)], payload, chunk.dtype_code,
                               chunk.round, self.config.timeout)
        except TimeoutError:
            raise KeyRefused(chunk.key_state.key, self._sum_stalled(name, chunk.index, link.rank)) from None

    @staticmethod
    def _not_an_encoding(name, header, rank):
        return (f"worker {rank} pushed key {name!r} chunk {header.chunk} round {header.round}: "
                f"{header.length} bytes that are not an encoding of the chunk by its declared compression")

    def _broadcast_open(self, name, rank):
        return f"worker {rank} pushpulled key {name!r} before its broadcast of that key completed"

    def _sum_stalled(self, name, index, rank):
        return (f"the sum of key {name!r} chunk {index} stayed locked for {self.config.timeout:g} s while "
                f"worker {rank}'s push waited: a co-located worker stalled or died adding into it")

    @staticmethod
    def _end_fill(link):
        """link's direct fill is over (its push arrived, or it died): let waiting adders in.
        The caller holds the chunk's lock."""
        chunk, link.filling = link.filling, None
        if chunk is not None and chunk.filling == link.rank:
            chunk.filling = None
            chunk.filled.notify_all()

    def _init_value(self, link, header, payload):
        chunk = self._chunk(link, header)
        if chunk.snapshots is not None:    # asynchronous mode: the stored value is also the weight
            if self._native is not None:
                self._native.set_value(chunk.native, payload)
                return
            with chunk.lock:
                chunk.buffers[0][:] = payload
            return
        with chunk.lock:
            if chunk.weight is None:
                if not self.budget.charge(chunk.nbytes):
                    raise KeyRefused(header.key, self._over_budget(
                        f"the starting weight of key {chunk.key_state.name!r} chunk {chunk.index} needs "
                        f"{_human_bytes(chunk.nbytes)}"))
                chunk.weight = np.empty(chunk.nbytes, np.uint8)
            if chunk.nbytes:
                chunk.weight[:] = payload

    def _optimizer_op(self, link, header, payload):
        from rdmakv.mxnet import optimizer   # MXNet is needed only once an optimizer is set
        try:
            if header.op == Op.SET_OPTIMIZER:
                self.updater = optimizer.make_updater(protocol.decode_json(payload or b""))
                if self._native is not None:
                    self._native.set_optimizer(True)
            elif header.op == Op.GET_STATES:
                states = self.updater.dump_states() if self.updater else b""
                link.reply(1 << 30, Op.STATES, states)
                return
            else:
                if self.updater is None:
                    raise ValueError("no optimizer is set on this server")
                self.updater.load_states(bytes(payload or b""))
        except (ValueError, TypeError) as exc:
            link.reply(1 << 30, Op.ERROR, protocol.encode_json({"message": f"server {self.rank}: {exc}"}))
            return
        link.reply(1 << 30, Op.ACK, None)


def main(argv=None):
    import sys
    from rdmakv.control.scheduler import Scheduler
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = Config.load()
        if config.role == "scheduler":
            return Scheduler(config).run()
        if config.role == "server":
            return ParameterServer(config).run()
        raise ConfigError("python -m rdmakv.server runs the scheduler or a server: set DMLC_ROLE")
    except RdmaKVError as exc:
        print(f"rdmakv: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
