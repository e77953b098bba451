"""The worker's API: KVStore.pushpull / broadcast / barrier over any transport.

A call validates its arrays, declares the key on first use (one message to
each server, no round trip), splits the tensor into chunks and queues them by
priority; per-server sender threads send chunks straight from the caller's
array under a byte credit, and per-server reader threads receive each result
straight into the caller's output array.

This module holds KVStore: its settings, joining the job, connecting to the
servers, the calls and their argument checks, declaring keys, the order of a
key's rounds on the Python data path, failures and closing.  The rest of the
worker is beside it, one job per module: arrays.py (the tensors' checks),
keys.py (names, wire keys, layout), handles.py, server_link.py and
engine_link.py (one server on the Python and native data paths; links.py what
both share), fusion.py, barriers.py, server_optimizer.py, lifetime.py (stores
open at exit)."""
from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import numpy.typing as npt

from rdmakv.control import auth, hierarchy, standalone, trace
from rdmakv.control.node import ControlLink
from rdmakv.core import compression as compression_settings
from rdmakv.core import netif, protocol
from rdmakv.core.config import Config
from rdmakv.core.errors import ClosedError, ConfigError, ConnectionClosed, RdmaKVError, RemoteError
from rdmakv.core.protocol import FLAG_BROADCAST, FLAG_NO_DATA, Op
from rdmakv.native import transport as _t
from rdmakv.transport import choose_transport
from rdmakv.worker import lifetime
from rdmakv.worker.arrays import as_array
from rdmakv.worker.barriers import Barriers
from rdmakv.worker.engine_link import EngineLink
from rdmakv.worker.fusion import FusedGroup, Fusion
from rdmakv.worker.handles import GroupHandle, Handle, NativeHandle, T
from rdmakv.worker.host_sums import HostSums
from rdmakv.worker.keys import DTYPE_CODE_OF, ChunkEncoder, Key, KeyInfo, key_name, wire_key
from rdmakv.worker.links import DIRECT_SEND_BYTES, describe_owing
from rdmakv.worker.server_link import ServerLink
from rdmakv.worker.server_optimizer import ServerOptimizer

log = logging.getLogger("rdmakv.worker")

__all__ = ["KVStore", "Key", "Handle", "GroupHandle", "FusedGroup", "key_name", "wire_key"]


class KVStore:
    """A worker's handle on the cluster: KVStore(**settings).

    Each setting may be given as a keyword, which wins over its RDMAKV_*
    variable, which wins over the DMLC_*/BYTEPS_* name (README, Settings):

    role               worker (a KVStore runs only on workers)
    scheduler_host     address of the scheduler (IPv4, IPv6 or host name); 127.0.0.1
    scheduler_port     TCP port of the scheduler; 9091
    num_workers        number of workers; 1
    num_servers        number of servers; 1
    worker_id          this worker's rank; default: assigned in arrival order
    server_id          a server's rank (servers only); default: assigned in arrival order
    interface          network interface whose address this node advertises
    node_host          address this node advertises
    port               port a server listens on (servers only)
    server_memory      bytes a server may commit to declared keys (servers only); its memory
    transport          auto, verbs, tcp or shm; auto
    partition_bytes    tensors larger than this are split into chunks; 4 MiB
    scheduling_credit  partitions in flight per server (0: no limit); 4
    timeout            seconds any blocking step may take; 120
    trace_dir          write a Chrome-trace timeline per rank into this directory
    trace_on           True traces (into trace_dir, else ./traces), False does not
    trace_start_step   first step traced (a round of the first key declared); 0
    trace_end_step     last step traced; default: to the end
    secret             cluster secret (HMAC challenge-response on every connection)
    secret_file        file holding the cluster secret
    integrity          True: a MAC on every TCP frame, keyed from the secret; False
    local_rank         rank among the workers on this host; default: from the scheduler
    engine             native (pushpulls in native threads where the links allow) or python; native
    spin_us            microseconds the native engine polls for a message before sleeping; 0
    mode               sync (a pushpull returns the round's sum over all workers) or async (each
                       push is applied on arrival, the reply is the value then); sync
    compression        (a keyword only) gradient compression of every float32 key declared by
                       this store (a declare() may name its own): MXNet's {'type': '2bit',
                       'threshold': t}, BytePS's compression_params, 'fp16', '2bit' or None
                       (rdmakv/core/compression.py); None
    hierarchy          True: workers sharing a host push once per host, through its local root,
                       to servers on other hosts (README, One push per host); True

    With no job setting at all (no role, scheduler, worker-count or rank
    variable or keyword), as in `python train.py` without a launcher, the
    store is the only worker of a job whose scheduler and one server run in
    this process (rdmakv/standalone.py).  An unknown keyword raises
    ConfigError."""

    config: Config
    rank: int
    num_workers: int
    num_servers: int
    local_rank: int
    local_size: int

    def __init__(self, **settings: Any) -> None:
        self._compression = compression_settings.parse(settings.pop("compression", None))
        self.config = Config.load(**{"role": "worker", **settings})
        self._check_compression(self._compression)
        if self.config.role != "worker":
            raise ConfigError(f"KVStore runs on workers; DMLC_ROLE is {self.config.role!r}")
        self.transport, self.transport_reason = choose_transport(self.config.transport)
        self._local_job = None
        if standalone.wanted(settings, os.environ):
            self._local_job = standalone.LocalJob(self.config)
            self.config = self._local_job.worker_config
        self._pid = os.getpid()
        self._closed = False
        self._failure = None
        self._said_goodbye = False    # then leaving is orderly, whatever a link saw afterwards
        self._lock = threading.Lock()
        self._keys: dict[Key, KeyInfo] = {}
        self._wire_keys: dict[int, KeyInfo] = {}
        self._handles: set[Handle[Any]] = set()   # added to without the lock (native path): read a copy
        self._handles_pruned_at = 64
        # The keys a pushpull_async may hand straight to the native engine: declared
        # there and not refused by a server (emptied when the job fails or the store closes).
        self._engine_keys: dict[Key, KeyInfo] = {}
        self._failed_wires: set[int] = set()    # wire keys a server refused
        self._fusion = Fusion(self)
        self._control = ControlLink(self.config, self.transport, "worker", self._on_control, self.job_failed)
        self._barriers = Barriers(self._control, lambda: self._failure)
        self._links = []
        self._engine = None           # the native data plane, where every link can use it
        self._engine_events = None    # the thread that hears what the engine's threads leave to Python
        self.host_sums = None         # one push per host: this worker's part, where its host has one
        try:
            host = netif.advertised_host(self.config)
            welcome = self._control.join(host, 0, self.config.worker_id,
                                         hierarchy=hierarchy.refusal(self.config, self._wants_native()))
            self.rank = welcome["rank"]
            self.num_workers = welcome["num_workers"]
            self.num_servers = welcome["num_servers"]
            self.local_rank = (self.config.local_rank if self.config.local_rank is not None
                               else welcome["local_rank"])
            self.local_size = welcome["local_size"]
            self.tracer = trace.make(self.config, "worker", self.rank)
            if welcome.get("hierarchy"):
                self.host_sums = HostSums(self.rank, welcome["hierarchy"], self.config.timeout)
            self._connect_servers(welcome["servers"])
        except BaseException:
            self._teardown()
            raise
        self.server_optimizer = ServerOptimizer(self._links, self._engine, self.config.timeout,
                                                self._declared_per_server)
        log.info("worker %d of %d connected to %d servers (%s; %s data path)", self.rank, self.num_workers,
                 self.num_servers, self.transport_reason, "native" if self._engine else "Python")
        lifetime.register(self)

    def _connect_servers(self, servers):
        """Connect to every server, then run the data path on the native engine if
        every connection is one it speaks (TCP frames without a MAC) and nothing
        needs a per-chunk Python hook (a trace), else on Python threads."""
        connections = []
        secret = auth.load_secret(self.config)
        wants_native = self._wants_native()
        try:
            for server_host, port in servers:
                connections.append(auth.open_connection(self.transport, server_host, port, secret,
                                                        self.config.timeout, integrity=self.config.integrity,
                                                        native=wants_native))
            native = wants_native and all(c.features.plain_frames for c in connections)
            if native:
                credit = self.config.scheduling_credit * self.config.partition_bytes
                self._engine = _t.Engine(len(connections), credit, DIRECT_SEND_BYTES, self.config.timeout, self.rank)
                self._engine.set_spin(self.config.spin_us / 1e6)
                if self.host_sums is not None:
                    part = self.host_sums
                    self._engine.set_host(part.is_root, len(part.workers) - 1,
                                          [rank in part.remote_servers for rank in range(len(servers))])
                self._engine_events = threading.Thread(target=self._hear_engine, daemon=True,
                                                       name="rdmakv-engine-events")
                self._engine_events.start()
            elif self.host_sums is not None:
                raise ConfigError(f"one push per host was planned, but worker {self.rank}'s links need the Python "
                                  f"data path ({', '.join(c.peer for c in connections)}): set RDMAKV_HIERARCHY=0")
            while connections:
                rank = len(self._links)
                link = (EngineLink if native else ServerLink)(self, rank, servers[rank])
                self._links.append(link)
                link.start(connections.pop(0))
        finally:
            for connection in connections:
                connection.close()

    def _wants_native(self):
        """Whether this worker asks for the native data path (its links decide in the end)."""
        return self.config.engine == "native" and not trace.enabled(self.config) and not self.config.integrity

    def _hear_engine(self):
        engine = self._engine
        while True:
            event = engine.next_event(1.0)
            if event is None:
                if self._closed:
                    return
                continue
            try:
                self._links[event[0]].on_event(event)
            except Exception:     # a bug here must not leave the store deaf
                log.exception("handling an event of the native engine failed")

    # ---- public API --------------------------------------------------------
    def init(self, key: Key, value: Any) -> None:
        """Declare key with value's shape and dtype; from rank 0, also store value on the servers
        (the starting weights when the servers run an optimizer; in asynchronous mode, the
        stored value, and init returns once the servers hold it)."""
        array = as_array(value, "value", key=key)
        info = self._declare(key, array.dtype, array.shape)
        if self.rank == 0:
            flat = array.reshape(-1).view(np.uint8)
            for chunk in info.chunks:
                self._links[chunk.server].send(
                    Op.INIT, flat[chunk.offset:chunk.offset + chunk.nbytes],
                    dtype=info.dtype_code, key=info.wire, chunk=chunk.index)
            if self.config.mode == "async":
                # Pushes are applied as they arrive: return once every server holds the value (a
                # pull, behind the INIT on each link), so a barrier() after init() puts it before
                # every other worker's pushes.
                self._submit(key, np.empty_like(array), None, 0, FLAG_NO_DATA).wait()

    def declare(self, key: Key, shape: Sequence[int], dtype: npt.DTypeLike, compression: Any = None) -> None:
        """Declare key's shape and dtype without data (any thread, in any order).
        compression: how its pushpulls are compressed (rdmakv/core/compression.py; 'none' for
        none); None: the store's `compression` setting."""
        dtype = np.dtype(dtype)
        if dtype not in DTYPE_CODE_OF:
            order = " (not this machine's byte order)" if dtype.name in protocol.DTYPE_CODES else ""
            raise TypeError(f"dtype {dtype.str}{order} is not summed by rdmakv; use one of "
                            f"{', '.join(protocol.DTYPE_CODES)}")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"shape {shape} has a negative dimension")
        chosen = None if compression is None else compression_settings.parse(compression)
        if chosen is not None:
            self._check_compression(chosen)
        self._declare(key, dtype, shape, chosen)

    def set_compression(self, compression: Any) -> None:
        """The compression of keys declared from now on without one of their own (see `compression`)."""
        chosen = compression_settings.parse(compression)
        self._check_compression(chosen)
        self._compression = chosen

    def wire_bytes(self) -> dict[str, int]:
        """Bytes this worker's data-path connections sent and received so far, over every
        server: {'sent': ..., 'received': ...} (frames whole: headers and payloads)."""
        totals = {"sent": 0, "received": 0}
        for link in self._links:
            if link.connected:
                sent, received = link.wire_bytes()
                totals["sent"] += sent
                totals["received"] += received
        return totals

    def pushpull_async(self, key: Key, value: T, out: Optional[T] = None, priority: int = 0) -> Handle[T]:
        """Start summing value over all workers into out (default: into value); returns a Handle.
        value must not change until the handle is done."""
        # The common call, a known key with numpy arrays as declared: _submit's checks, each
        # reduced to a comparison with the declaration (anything else takes _submit's path,
        # which says what is wrong).  flags.carray: C-contiguous, aligned and writable.
        try:
            info = self._engine_keys.get(key)
        except TypeError:             # unhashable: not a key, as _submit says
            info = None
        if info is not None and type(key) is info.key_type and type(value) is np.ndarray \
                and value.dtype is info.dtype and value.shape == info.shape \
                and type(priority) is int and -2**31 <= priority < 2**31:
            if out is None:
                if value.flags.carray:
                    return self._submit_known(info, value, value, value, priority, 0)
            elif type(out) is np.ndarray and out.dtype is info.dtype and out.shape == info.shape \
                    and out.flags.carray and value.flags.c_contiguous:
                return self._submit_known(info, value, out, out, priority, 0)
        return self._submit(key, value, out, priority, 0)

    def pushpull(self, key: Key, value: T, out: Optional[T] = None, priority: int = 0) -> T:
        """The elementwise sum over all workers of this round's value for key."""
        return self.pushpull_async(key, value, out, priority).wait()

    def fuse(self, keys: Sequence[Key], values: Sequence[Any], outs: Optional[Sequence[Any]] = None) -> FusedGroup:
        """A FusedGroup: these keys, checked and laid out once, to pushpull
        together every step with `group.pushpull()`.  Tensors of FUSE_BYTES or
        less are packed per dtype into one fused tensor, summed as one key
        (named after the whole group) and unpacked; larger ones go as ordinary
        pushpulls.  Every worker must fuse the same keys in the same order."""
        return FusedGroup(self._fusion, keys, values, outs)

    def pushpull_many_async(self, keys: Sequence[Key], values: Sequence[Any], outs: Optional[Sequence[Any]] = None,
                            priority: int = 0) -> GroupHandle:
        """pushpull for many keys at once (a one-off fuse()); returns a
        GroupHandle whose wait() gives the results."""
        return FusedGroup(self._fusion, keys, values, outs).pushpull_async(priority)

    def pushpull_many(self, keys: Sequence[Key], values: Sequence[Any], outs: Optional[Sequence[Any]] = None,
                      priority: int = 0) -> list[Any]:
        """The sums of many keys at once (see pushpull_many_async)."""
        return self.pushpull_many_async(keys, values, outs, priority).wait()

    def broadcast_async(self, key: Key, value: T, out: Optional[T] = None, root: int = 0,
                        priority: int = 0) -> Handle[T]:
        """Start sending the root's value to every worker; returns a Handle."""
        if not isinstance(root, int) or not 0 <= root < self.num_workers:
            raise ValueError(f"root {root!r} is not a worker rank (0..{self.num_workers - 1})")
        flags = FLAG_BROADCAST | (0 if self.rank == root else FLAG_NO_DATA)
        return self._submit(key, value, out, priority, flags)

    def broadcast(self, key: Key, value: T, out: Optional[T] = None, root: int = 0, priority: int = 0) -> T:
        """Every worker receives the root's value."""
        return self.broadcast_async(key, value, out, root, priority).wait()

    def barrier(self, timeout: Optional[float] = None) -> None:
        """Return once every worker has called barrier()."""
        self._check_open()
        self._barriers.wait(self.config.timeout if timeout is None else timeout)

    def close(self, timeout: Optional[float] = None) -> None:
        """Finish outstanding operations, tell the scheduler we are done, release everything. Idempotent."""
        if self._closed:
            return
        if os.getpid() != self._pid:
            self._closed = True      # a forked child must not tear down the parent's connections
            return
        limit = self.config.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._lock:
            handles = list(self._handles)
        unfinished = None             # an operation that never completed: this worker leaves a failed job
        for handle in handles:
            if handle.expired is not None and not handle.done():   # a wait already gave up on it
                unfinished = unfinished or handle.expired
            elif not handle.wait_done(deadline - time.monotonic()):
                unfinished = unfinished or handle.timeout_error(limit)
        if self._failure is None and unfinished is None:
            try:
                self._control.send(Op.GOODBYE)
                self._said_goodbye = True
            except RdmaKVError as exc:
                log.warning("could not say goodbye to the scheduler: %s", exc)
        self._teardown(unfinished)

    def close_at_exit(self):
        """What interpreter exit does with a store still open: after a normal exit, close()
        (outstanding operations finish, the scheduler hears GOODBYE); after an unhandled
        exception, leave the job failed, telling the scheduler and the servers which."""
        if self._closed or os.getpid() != self._pid:
            return
        unhandled = lifetime.unhandled_exit()
        if unhandled is None:
            try:
                self.close()
            except RdmaKVError as exc:
                log.error("worker %d: closing at exit: %s", self.rank, exc)
            return
        self._teardown(RdmaKVError(f"exited with an unhandled {type(unhandled).__name__}: {unhandled}"))

    def _teardown(self, leaving_because=None):
        """Release everything.  The one place a worker leaving a failed job says why:
        to the scheduler (which fails the job naming this worker and the reason,
        unless it already failed) and to every server, or the other workers would
        only hear that this worker left.  The reason is the job's failure as this
        worker heard it, else leaving_because (an operation that never completed,
        an unhandled exception), else a server link's error."""
        self._closed = True
        self._engine_keys.clear()
        lifetime.unregister(self)
        reason = self._failure or leaving_because or next(
            (link.error for link in self._links if link.error is not None), None)
        if reason is not None and not self._said_goodbye and self._control.peer is not None:
            try:
                self._control.send(Op.ERROR, {"message": str(reason)})
            except RdmaKVError:
                pass                  # the scheduler is gone already; the servers still hear it
        for link in self._links:
            # Even to a server whose link already failed because of news from elsewhere
            # (the scheduler's report): it may not have heard that news yet.
            if reason is not None and link.connected:
                try:
                    link.send_json(Op.ERROR, {"message": str(reason)})
                except RdmaKVError:
                    pass
            link.close()
        if self._engine is not None:
            self._engine.close()      # joins its threads: nothing touches a connection or a buffer after
            for link in self._links:
                if link.connected:
                    link.connection.close()
            if self._engine_events is not None and self._engine_events is not threading.current_thread():
                self._engine_events.join(5)
            self._engine.reap()
        if self.host_sums is not None:
            self.host_sums.close()
        self._control.close()
        if getattr(self, "tracer", None):
            self.tracer.write()
        if self._local_job is not None:
            self._local_job.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            warnings.warn("rdmakv.KVStore was not closed", ResourceWarning, stacklevel=2)

    def _declared_per_server(self):
        """(bytes, chunks) of the keys declared, per server."""
        totals = [[0, 0] for _ in self._links]
        with self._lock:
            for info in self._keys.values():
                info.chunks_per_server(totals)
        return totals

    # ---- for the store's links and handles (rdmakv/worker/) ------------------
    @property
    def engine(self):
        """The native engine (rdmakv.native), where the data path runs on it; else None."""
        return self._engine

    def key_refused(self, wire):
        """Whether a server refused the key of this wire key."""
        return wire in self._failed_wires

    def largest_chunk(self, wire):
        """Bytes of the largest chunk of the key of this wire key, None if no key has it."""
        info = self._wire_keys.get(wire)
        return None if info is None else max((c.nbytes for c in info.chunks), default=0)

    def outcome_error(self, outcome, info):
        """What failed an operation of key info in the native engine, from its (outcome, link)."""
        code, link = outcome
        if code == _t.OUTCOME_LINK_FAILED:
            return self._links[link].error
        if code == _t.OUTCOME_KEY_FAILED:
            return info.error
        if code == _t.OUTCOME_CANCELLED:
            return self._failure or ClosedError("the KVStore is closed")
        return None

    def owing(self, handle):
        """Which servers still owe results for handle, and for which chunks."""
        return describe_owing(self._links, handle)

    def advance(self, handle):
        """handle is done: start its key's next round, if one waits (Python data path)."""
        info = handle.info
        with self._lock:
            self._handles.discard(handle)
            if info.active is not handle:
                return
            info.active = info.waiting.popleft() if info.waiting else None
            following = info.active
        if following is not None:
            if following.done():
                self.advance(following)
            elif info.error is not None:
                following.finish(info.error)
            else:
                self._start(following)

    def key_failed(self, wire, error):
        """A server refused the key of this wire key: fail what waits on it, and its later calls."""
        with self._lock:
            info = self._wire_keys.get(wire)
            if info is None:
                return
            if info.error is None:
                info.error = error
            self._failed_wires.add(wire)
            self._engine_keys.pop(info.key, None)
            pending = [h for h in list(self._handles) if h.info is info]
        log.error("key %r failed: %s", info.name, error)
        if self._engine is not None:
            self._engine.fail_key(info.engine_key)
            return
        for link in self._links:
            link.drop_key(wire)
        for handle in pending:
            handle.finish(info.error)

    def job_failed(self, error):
        """The scheduler or a server says the job failed, or the scheduler is lost:
        fail every operation and barrier waiting, and every later call."""
        if self._closed:
            return
        if not isinstance(error, RemoteError):
            error = ConnectionClosed(f"lost the scheduler: {error}")
        if self._failure is None:     # the first report says why; the closing link that follows does not
            self._failure = error
        self._engine_keys.clear()
        self._barriers.wake()
        for link in self._links:
            link.fail(error)

    # ---- internals ---------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise ClosedError("the KVStore is closed")
        if self._failure is not None:
            raise self._failure

    def _declare(self, key, dtype, shape, compression=None):
        self._check_open()
        # Keys are only ever added, once announced: a known one needs no lock.
        info = self._keys.get(key) if type(key) is str or type(key) is int else None
        if info is None:
            info = self._add_key(key, dtype, shape, compression)
        if info.dtype != dtype or info.shape != shape:
            raise ValueError(f"key {key_name(key)!r} was declared as {info.dtype}{list(info.shape)}, "
                             f"now used with {dtype}{list(shape)}")
        if compression is not None and compression != info.compression:
            raise ValueError(f"key {key_name(key)!r} was declared with compression {info.compression.kind!r}, "
                             f"now with {compression.kind!r}")
        return info

    def _check_compression(self, chosen):
        if chosen.active and self.config.mode == "async":
            raise ConfigError(f"gradient compression ({chosen.kind}) is not supported in asynchronous mode "
                              f"(RDMAKV_MODE=async): the server would have to decode each push alone")

    def _add_key(self, key, dtype, shape, compression=None):
        name = key_name(key)
        compression = self._compression if compression is None else compression
        if compression.active and dtype != np.float32:
            raise TypeError(f"key {name!r} is {dtype}: gradient compression ({compression.kind}) takes float32 "
                            f"keys only; declare it with compression='none'")
        with self._lock:
            info = self._keys.get(key)
            if info is not None:      # another thread declared it meanwhile
                return info
            wire = wire_key(key)
            if wire in self._wire_keys:
                raise ValueError(f"keys {self._wire_keys[wire].name!r} and {name!r} collide; rename one")
            info, layout = KeyInfo.lay_out(key, wire, len(self._keys), dtype, shape, self.config.partition_bytes,
                                           self.num_servers, compression)
            chunks = info.chunks
            codecs = info.codecs() if compression.active else []   # a kind this build lacks fails here
            # Every server sees every declaration, so they can check that all workers agree.
            if self._engine is not None:
                host_memory = host_offsets = None
                # A compressed key's pushes are encodings, summed only by the servers.
                if (self.host_sums is not None and not compression.active
                        and any(c.server in self.host_sums.remote_servers for c in chunks)):
                    host_memory, host_offsets = self.host_sums.map_key(wire, [c.nbytes for c in chunks])
                info.engine_key = self._engine.add_key(wire, info.order, info.dtype_code,
                                                       [c.offset for c in chunks], [c.nbytes for c in chunks],
                                                       [c.server for c in chunks], host_memory, host_offsets)
                for index, codec in enumerate(codecs):
                    self._engine.set_codec(info.engine_key, index, codec)
            elif codecs:
                info.encoders = [ChunkEncoder(codec, chunk) for codec, chunk in zip(codecs, chunks)]
            for link in self._links:
                link.send(Op.DECLARE, layout)
            self._wire_keys[wire] = info
            self._keys[key] = info
            if self._engine is not None:
                self._engine_keys[key] = info
        return info

    def _submit(self, key, value, out, priority, flags):
        if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)) \
                or not -2**31 <= priority < 2**31:
            raise ValueError(f"priority must be a 32-bit integer, got {priority!r}")
        source = as_array(value, "value", writable=out is None and not flags & FLAG_NO_DATA, key=key)
        if out is None:
            target, result_obj = source, value
            if flags & FLAG_NO_DATA and not source.flags.writeable:
                raise ValueError(f"value of key {key_name(key)!r} is read-only and no out= was given for the "
                                 f"broadcast result")
        else:
            target, result_obj = as_array(out, "out", writable=True, key=key), out
            if target.dtype != source.dtype or target.shape != source.shape:
                raise ValueError(f"out of key {key_name(key)!r} is {target.dtype}{list(target.shape)} but value "
                                 f"is {source.dtype}{list(source.shape)}")
        info = self._declare(key, source.dtype, source.shape)
        if info.error is not None:
            raise info.error
        if self._engine is not None:
            return self._submit_known(info, source, target, result_obj, int(priority), flags)
        handle = Handle(self, info, source, target, result_obj, int(priority), flags)
        with self._lock:
            handle.round = info.next_round
            info.next_round += 1
            self._handles.add(handle)
            start = info.active is None
            if start:
                info.active = handle
            else:
                info.waiting.append(handle)
        if start:
            self._start(handle)
        return handle

    def _submit_known(self, info, source, target, result_obj, priority, flags):
        """Hand a checked pushpull or broadcast of a declared key to the native engine."""
        engine = self._engine
        engine.reap()
        operation = engine.submit(info.engine_key, None if flags & FLAG_NO_DATA else source, target, priority, flags)
        handle = NativeHandle(self, info, operation, result_obj, priority, flags)
        handles = self._handles
        handles.add(handle)           # atomic under the GIL: no lock on the way of every call
        if len(handles) >= self._handles_pruned_at:
            # Handles nobody waits for (done-callbacks only) leave here, in batches, from
            # a copy: other threads may add theirs meanwhile, and only done ones are dropped.
            for old in list(handles):
                if old.done():
                    handles.discard(old)
            self._handles_pruned_at = max(64, 2 * len(handles))
        return handle

    def _start(self, handle):
        info = handle.info
        source = handle.source.reshape(-1).view(np.uint8)
        target = handle.target.reshape(-1).view(np.uint8)
        tracer = self.tracer
        if tracer and info.order == 0:
            tracer.begin_step(handle.round)
        try:
            for chunk in info.chunks:
                if tracer:
                    tracer.stage("queued", key=info.name, chunk=chunk.index, round=handle.round,
                                   priority=handle.priority)
                end = chunk.offset + chunk.nbytes
                self._links[chunk.server].enqueue(handle, chunk, source[chunk.offset:end],
                                                  target[chunk.offset:end])
        except RdmaKVError as exc:
            handle.finish(exc)

    def _on_control(self, header, obj):
        if header.op == Op.BARRIER_DONE:
            self._barriers.passed(header.round)
        elif header.op == Op.ERROR:
            self.job_failed(RemoteError(f"the scheduler reports: {protocol.peer_text(obj, default='job failed')}"))
