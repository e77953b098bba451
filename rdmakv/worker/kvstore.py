"""The worker side: KVStore.pushpull / broadcast / barrier over any transport.

A call validates its arrays, declares the key on first use (one message to
each server, no round trip), splits the tensor into chunks and queues them by
priority; per-server sender threads send chunks straight from the caller's
array under a byte credit, and per-server reader threads receive each result
straight into the caller's output array."""
from __future__ import annotations

import atexit
import hashlib
import logging
import math
import os
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from typing import Any, Callable, Generic, Iterable, Optional, Sequence, TypeVar, Union

import numpy as np
import numpy.typing as npt

from rdmakv.control import auth, standalone, trace
from rdmakv.control.node import ControlLink
from rdmakv.core import netif, partition, protocol
from rdmakv.core.chunk_queue import ChunkQueue
from rdmakv.core.config import Config
from rdmakv.core.errors import (ClosedError, ConfigError, ConnectionClosed, EndOfStream, PeerTimeout, ProtocolError,
                                RdmaKVError, RemoteError)
from rdmakv.core.protocol import FLAG_ACK, FLAG_BROADCAST, FLAG_NO_DATA, Op
from rdmakv.native import transport as _t
from rdmakv.transport import choose_transport
from rdmakv.transport.base import Handler, Peer, closed_connection_warnings
from rdmakv.transport.tcp import TcpConnection, engine_read_error, engine_stream_error

log = logging.getLogger("rdmakv.worker")

Key = Union[str, int]
"""A key: 3 and "3" are different keys."""
T = TypeVar("T")
"""A tensor: a numpy array, or any object with the buffer protocol or __dlpack__."""

DIRECT_SEND_BYTES = 64 * 1024
FUSE_BYTES = 64 * 1024        # fused groups pack tensors this small into one per dtype
DTYPE_CODE_OF = {np.dtype(name): code for name, code in protocol.DTYPE_CODES.items()}

# Scripts written for MXNet or BytePS never close their store: one still open
# when the interpreter exits is closed then (as Horovod and BytePS shut down at
# exit), unless an unhandled exception ends the program, which fails the job.
_open_stores = weakref.WeakSet()
_exit_hooks_installed = False
_unhandled_exit = None          # the exception that ended the main thread, if one did


def _install_exit_hooks():
    """Once per process, at the first KVStore: atexit hooks run last-registered
    first, so a framework imported before the store (MXNet) shuts down after it."""
    global _exit_hooks_installed
    if _exit_hooks_installed:
        return
    _exit_hooks_installed = True
    previous = sys.excepthook

    def remember_unhandled(kind, value, traceback):
        global _unhandled_exit
        _unhandled_exit = value
        previous(kind, value, traceback)

    sys.excepthook = remember_unhandled
    atexit.register(_close_open_stores)


def _close_open_stores():
    for store in list(_open_stores):
        store.close_at_exit()


def as_array(obj, what, writable=False, key=None):
    """A numpy view (no copy) of a C-contiguous numpy, buffer-protocol or DLPack array.
    Errors name `what` (and the key, if given)."""
    if type(obj) is np.ndarray and obj.dtype in DTYPE_CODE_OF and obj.flags.c_contiguous \
            and (obj.flags.writeable or not writable):
        return obj                    # the common case, without building any message
    if key is not None:
        what = f"{what} of key {key_name(key)!r}"
    if isinstance(obj, np.ndarray):
        array = obj
    elif hasattr(obj, "__dlpack__"):
        if hasattr(obj, "__dlpack_device__"):
            kind, index = obj.__dlpack_device__()
            if kind not in HOST_DLPACK_DEVICES:
                raise TypeError(f"{what} is in {DLPACK_DEVICES.get(kind, f'DLPack device type {kind}')} memory "
                                f"(device {index}); rdmakv sums host memory: copy it to the CPU first")
        array = np.from_dlpack(obj)
        if writable and not array.flags.writeable:
            array = _writable_dlpack_view(array)
    else:
        try:
            array = np.asarray(memoryview(obj))
        except TypeError:
            raise TypeError(f"{what} must be a numpy array or support the buffer protocol or DLPack, "
                            f"not {type(obj).__name__}") from None
    if array.dtype not in DTYPE_CODE_OF:
        raise TypeError(f"{what} has dtype {array.dtype}, which rdmakv does not sum; "
                        f"use one of {', '.join(protocol.DTYPE_CODES)}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous; pass numpy.ascontiguousarray({what})")
    if writable and not array.flags.writeable:
        raise ValueError(f"{what} is read-only, so the result cannot be written into it; pass a writable out=")
    return array


# DLPack's DLDeviceType values (dlpack.h): those numpy can view are host memory.
HOST_DLPACK_DEVICES = (1, 3, 11)      # CPU, CUDA pinned host, ROCm pinned host
DLPACK_DEVICES = {2: "CUDA", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI", 10: "ROCm", 12: "extension-device",
                  13: "CUDA managed", 14: "oneAPI", 15: "WebGPU", 16: "Hexagon"}


def _writable_dlpack_view(array):
    """numpy < 2.1 marks every DLPack import read-only because DLPack 0.x had no
    read-only flag; the producer's memory is writable by that protocol's rules,
    so view the same memory writably, keeping the import alive as its base."""
    import ctypes
    if array.nbytes == 0:
        return np.empty(array.shape, array.dtype)
    memory = (ctypes.c_char * array.nbytes).from_address(array.__array_interface__["data"][0])
    memory._keepalive = array
    return np.frombuffer(memory, array.dtype).reshape(array.shape)


def key_name(key):
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"keys are str or int, not {type(key).__name__}")
    return key if isinstance(key, str) else f"#{key}"


def wire_key(key):
    tag = ("s:" + key) if isinstance(key, str) else f"i:{key}"
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=8).digest(), "little")


class KeyInfo:
    def __init__(self, key, wire, order, dtype, shape, nbytes, chunks):
        self.key = key
        self.name = key_name(key)
        self.wire = wire
        self.order = order
        self.dtype = dtype
        self.dtype_code = DTYPE_CODE_OF[dtype]
        self.shape = shape
        self.nbytes = nbytes
        self.chunks = chunks
        self.next_round = 0
        self.active = None            # the operation whose chunks are out
        self.waiting = deque()        # later rounds, started in turn
        self.error = None
        self.engine_key = None        # the key as the native engine knows it, where it runs


class Handle(Generic[T]):
    """An operation in flight: wait() for its result, or poll done()."""

    def __init__(self, store, info, value, out, result_obj, priority, flags):
        self._store = store
        self.key = info.key
        self._info = info
        self._value = value           # held: sent from in place, must outlive the sends
        self._out = out
        self._result = result_obj
        self.priority = priority
        self.flags = flags
        self.round = None
        self._remaining = len(info.chunks)
        self._lock = threading.Lock()
        # Held until the operation is done: waiting is acquire-then-release, which is
        # much cheaper to set up than a threading.Event for every pushpull.
        self._pending = threading.Lock()
        self._pending.acquire()
        self._settled = False         # the outcome is known; done-callbacks may still be running
        self._is_done = False         # callbacks ran too: waiters may look at the result
        self._expired = None          # the PeerTimeout of a wait() that gave up after RDMAKV_TIMEOUT
        self._error = None
        self._callbacks = []

    def done(self) -> bool:
        return self._is_done

    def _wait_done(self, timeout):
        if self._is_done:
            return True
        if not self._pending.acquire(timeout=max(0.0, timeout)):
            return False
        self._pending.release()       # let any other waiter through too
        return True

    def wait(self, timeout: Optional[float] = None) -> T:
        """The result (the `out` given, else `value`); raises what failed the operation.
        timeout=None waits up to RDMAKV_TIMEOUT."""
        limit = self._store.config.timeout if timeout is None else timeout
        if not self._wait_done(limit):
            error = self._timed_out(limit)
            if timeout is None:
                self._expired = error  # close() then leaves at once, telling the others why
            raise error
        if self._error is not None:
            raise self._error
        return self._result

    def _timed_out(self, limit):
        owing = self._store._owing(self)
        who = (f"still waiting for {'; '.join(owing)}" if owing
               else "its chunks wait behind an earlier round of the same key")
        return PeerTimeout(f"pushpull of key {self._info.name!r} (round {self.round}) did not complete "
                           f"within {limit:g} s: {who}; a worker or server is slow or gone")

    def exception(self) -> Optional[BaseException]:
        """What failed the operation, or None; meant for done-callbacks."""
        return self._error

    def add_done_callback(self, fn: Callable[[Handle[T]], object]) -> None:
        """Call fn(handle) once the outcome is known (at once if it is), from a transport
        thread, before wait() returns."""
        with self._lock:
            if not self._settled:
                self._callbacks.append(fn)
                return
        fn(self)

    def _chunk_done(self):
        with self._lock:
            self._remaining -= 1
            finished = self._remaining == 0 and not self._settled
        if finished:
            self._finish(None)

    def _finish(self, error):
        with self._lock:
            if self._settled:
                return False
            self._error = error
            self._value = None
            self._settled = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("done-callback of key %r failed", self.key)
        self._is_done = True
        self._pending.release()
        self._store._advance(self._info, self)
        return True


class NativeHandle(Handle[T]):
    """A Handle whose operation runs in the native engine (EngineLink)."""

    def __init__(self, store, info, operation, result_obj, priority, flags):
        self._store = store
        self.key = info.key
        self._info = info
        self._op = operation
        self._result = result_obj
        self.priority = priority
        self.flags = flags
        self.round = operation.round
        self._expired = None
        self._error = None

    def done(self) -> bool:
        return self._op.done()

    def _wait_done(self, timeout):
        return self._op.wait(max(0.0, timeout))

    def wait(self, timeout: Optional[float] = None) -> T:
        limit = self._store.config.timeout if timeout is None else timeout
        if not self._op.wait(limit):
            # Failed already (its server's link, say) while a send on that link still holds
            # the buffers until it gives up: the failure is the answer, not a timeout.
            error = self.exception() if self._op.settled() else None
            if error is None:
                error = self._timed_out(limit)
                if timeout is None:
                    self._expired = error
            raise error
        self._store._engine.reap()
        error = self.exception()
        if error is not None:
            raise error
        return self._result

    def exception(self) -> Optional[BaseException]:
        if self._error is None:
            outcome, link = self._op.outcome
            if outcome == _t.OUTCOME_LINK_FAILED:
                self._error = self._store._links[link].error
            elif outcome == _t.OUTCOME_KEY_FAILED:
                self._error = self._info.error
            elif outcome == _t.OUTCOME_CANCELLED:
                self._error = self._store._failure or ClosedError("the KVStore is closed")
        return self._error

    def add_done_callback(self, fn: Callable[[Handle[T]], object]) -> None:
        self._op.add_done_callback(fn, self)

    def add_native_completion(self, complete: int, engine: int, param: int,
                              on_failure: Callable[[Handle[T]], object]) -> None:
        """If the operation succeeds, the engine thread that finishes it calls the C function
        at address complete as complete(engine, param, NULL), without the GIL (MXNet's
        on_complete, rdmakv/mxnet); if it fails, on_failure(handle) is called instead, as a
        done-callback.  One of the two is called, once."""
        self._op.complete_natively(complete, engine, param, on_failure, self)


class GroupHandle:
    """Several operations waited on as one."""

    def __init__(self, parts, results):
        self._parts = parts
        self._results = results

    def done(self) -> bool:
        return all(part.done() for part in self._parts)

    def wait(self, timeout: Optional[float] = None) -> list[Any]:
        """The list of results, in the order of the keys."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for part in self._parts:
            part.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._results


class FusedGroup:
    """Keys pushpulled together (KVStore.fuse).  The group keeps the arrays it
    was given: each call sums their current contents into the outputs, with
    one copy in and one copy out for all the small tensors of a dtype."""

    def __init__(self, store: KVStore, keys: Iterable[Key], values: Iterable[Any],
                 outs: Optional[Iterable[Any]] = None) -> None:
        keys, values = list(keys), list(values)
        outs = [None] * len(keys) if outs is None else list(outs)
        if not len(keys) == len(values) == len(outs):
            raise ValueError(f"{len(keys)} keys, {len(values)} values and {len(outs)} outs do not match")
        if len(set(keys)) != len(keys):
            raise ValueError("a fused group got the same key twice")
        self._store = store
        self._large = []              # (key, value, out) pushpulled one by one
        small: dict = {}
        for key, value, out in zip(keys, values, outs):
            source = as_array(value, "value", writable=out is None, key=key)
            target = source if out is None else as_array(out, "out", writable=True, key=key)
            if target.dtype != source.dtype or target.shape != source.shape:
                raise ValueError(f"out of key {key_name(key)!r} is {target.dtype}{list(target.shape)} but its "
                                 f"value is {source.dtype}{list(source.shape)}")
            if source.nbytes <= FUSE_BYTES:
                small.setdefault(source.dtype, []).append((key, source, target))
            else:
                self._large.append((key, value, out))
        # (fused key, dtype, sources, targets, elements) per dtype
        self._fused = [(store._fused_layout(dtype, members), dtype, [source for _, source, _ in members],
                        [target for _, _, target in members], sum(source.size for _, source, _ in members))
                       for dtype, members in small.items()]
        self.results = [value if out is None else out for value, out in zip(values, outs)]

    def pushpull_async(self, priority: int = 0) -> GroupHandle:
        """Start this step's sums; a GroupHandle whose wait() gives the results."""
        store = self._store
        parts = [store.pushpull_async(key, value, out, priority) for key, value, out in self._large]
        parts += [store._fused_pushpull(group, dtype, sources, targets, size, priority)
                  for group, dtype, sources, targets, size in self._fused]
        return GroupHandle(parts, self.results)

    def pushpull(self, priority: int = 0) -> list[Any]:
        """This step's sums, in the order of the keys."""
        return self.pushpull_async(priority).wait()


class _ServerLinkBase:
    """What both data paths do with one server: its control requests and answers."""

    def __init__(self, store, rank, address):
        self.store = store
        self.rank = rank
        self.address = address
        self.replies = deque()        # control answers (ACK/STATES/ERROR) to a waiting request
        self.replied = threading.Condition()
        self.error = None

    def describe(self):
        return f"server {self.rank} at {netif.format_address(*self.address)}"

    def send_json(self, op, obj, **fields):
        self.send(op, protocol.encode_json(obj), **fields)

    def on_control(self, header, payload):
        """A message from the server other than a result or a credit return."""
        if header.op == Op.ERROR:
            obj = protocol.decode_json(payload or b"")
            message = protocol.peer_text(obj)
            if obj.get("fatal") is True:
                self.store._on_lost(RemoteError(message))
            elif isinstance(obj.get("key"), int):
                self.store._fail_key(obj["key"], RemoteError(message))
            else:
                with self.replied:
                    self.replies.append(RemoteError(message))
                    self.replied.notify_all()
        elif header.op == Op.WAITING:
            # The server still waits for these workers' pushes: named if this round times out.
            missing = protocol.decode_json(payload or b"").get("missing")
            missing = [rank for rank in missing if type(rank) is int and 0 <= rank < self.store.num_workers] \
                if isinstance(missing, list) else []
            self.note_missing(header, missing)
        elif header.op in (Op.ACK, Op.STATES):
            with self.replied:
                self.replies.append(bytes(payload or b""))
                self.replied.notify_all()
        else:
            raise ProtocolError(f"unexpected {protocol.op_name(header.op)} from {self.describe()}")

    def request(self, op, payload, timeout):
        """Send a control request and wait for its ACK/STATES answer."""
        with self.replied:
            self.replies.clear()
        self.send(op, payload)
        with self.replied:
            if not self.replied.wait_for(lambda: self.replies or self.error, timeout):
                raise PeerTimeout(f"{self.describe()} did not answer {protocol.op_name(op)} within {timeout:g} s")
            if self.error is not None:
                raise self.error
            answer = self.replies.popleft()
        if isinstance(answer, Exception):
            raise answer
        return answer


class ServerLink(_ServerLinkBase, Handler):
    """One server on the Python data path: its connection, its send queue and
    sender thread, and the results it owes us, keyed by (wire key, chunk, round)."""

    def __init__(self, store, rank, address):
        super().__init__(store, rank, address)
        self.peer = None
        self.queue = ChunkQueue(store.config.scheduling_credit * store.config.partition_bytes)
        self.ready = threading.Condition()
        self.expected = {}
        self.sending = False          # a thread is sending: only one takes from the queue at a time
        self.sender = threading.Thread(target=self._send_loop, daemon=True, name=f"rdmakv-send-{rank}")

    def start(self, connection):
        self.peer = Peer(connection, self, f"server {self.rank}").start()
        self.peer.send_json(Op.CONNECT, {"rank": self.store.rank})
        self.sender.start()

    @property
    def connected(self):
        return self.peer is not None

    @property
    def connection(self):
        return self.peer.connection

    def send(self, op, payload=None, **fields):
        self.peer.send(op, payload, **fields)

    def owed(self, handle):
        """[(chunk index, the workers the server said it waits for, or None)] still owed for handle."""
        with self.ready:
            return [(slot[1], entry[4]) for slot, entry in self.expected.items() if entry[0] is handle]

    def note_missing(self, header, missing):
        with self.ready:
            entry = self.expected.get((header.key, header.chunk, header.round))
            if entry is not None:
                entry[4] = missing

    def enqueue(self, handle, chunk, source, destination):
        # Before the push: the result can then be written straight into destination (verbs).
        self.peer.offer(Op.RESULT, handle._info.wire, chunk.index, handle.round, destination)
        with self.ready:
            if self.error is not None:
                raise self.error
            slot = (handle._info.wire, chunk.index, handle.round)
            # handle, destination, bytes, holds credit, the workers the server said it still waits for
            self.expected[slot] = [handle, destination, chunk.nbytes, False, None]
            # Credit counts bytes sent and not yet in the server's hands (it answers
            # RECEIVED), never bytes waiting for the round's sum: that needs the
            # other workers' chunks, and workers whose credit went to different
            # chunks would wait for each other forever.  Small chunks take none.
            credit = chunk.nbytes if chunk.nbytes > DIRECT_SEND_BYTES and self.queue.credit else 0
            self.queue.push((handle, chunk, source, slot), priority=handle.priority,
                            key_order=handle._info.order, chunk=chunk.index, nbytes=credit)
            # A small chunk with nothing ahead of it is sent by the calling thread:
            # no hand-off to the sender thread, which costs more than the send.
            item = None
            if not self.sending and len(self.queue) == 1 and chunk.nbytes <= DIRECT_SEND_BYTES:
                item = self._take()
            if item is None:
                self.ready.notify()
                return
            self.sending = True
        self._transmit(item)

    def _take(self):
        """The next chunk to send (caller holds self.ready), or None if none may go now."""
        while (popped := self.queue.pop()) is not None:
            (handle, chunk, source, slot), nbytes = popped
            entry = self.expected.get(slot)
            if entry is not None and not handle._settled:
                if nbytes:
                    entry[3] = True   # holds credit until RECEIVED (or the result) comes back
                else:
                    self.queue.finish(0)
                return handle, chunk, source, entry[3]
            self.queue.finish(nbytes)
        return None

    def _transmit(self, item):
        handle, chunk, source, credited = item
        info = handle._info
        try:
            self.peer.send(Op.PUSH, None if handle.flags & FLAG_NO_DATA else source,
                           dtype=info.dtype_code,
                           flags=handle.flags | (FLAG_ACK if credited else 0), key=info.wire,
                           chunk=chunk.index, priority=handle.priority, round=handle.round,
                           sender=self.store.rank)
        except RdmaKVError as exc:
            self.fail(ConnectionClosed(f"sending to {self.describe()} failed: {exc}"))
        finally:
            with self.ready:
                self.sending = False
                if self.queue:        # waking an idle sender thread would only cost a GIL hand-off
                    self.ready.notify()
        if self.store.tracer:
            self.store.tracer.stage("sent", key=info.name, chunk=chunk.index, round=handle.round,
                                      priority=handle.priority)

    def _send_loop(self):
        while True:
            with self.ready:
                while True:
                    if self.error is not None:
                        return
                    if not self.sending and (item := self._take()) is not None:
                        self.sending = True
                        break
                    self.ready.wait()
            self._transmit(item)

    # reader-thread callbacks
    def destination(self, peer, header):
        if header.op != Op.RESULT:
            if header.op == Op.STATES:
                return bytearray(header.length)   # optimizer state: sized by what we asked for
            return None
        with self.ready:
            entry = self.expected.get((header.key, header.chunk, header.round))
        if entry is None and (header.key in self.store._failed_wires or self.error is not None):
            # A result that crossed its key's failure, or this link's (the job failed and
            # what was owed was let go): taken in and dropped, no more than a chunk of the key.
            info = self.store._wire_keys.get(header.key)
            if info is not None and header.length <= max((c.nbytes for c in info.chunks), default=0):
                return bytearray(header.length)
        if entry is None:
            raise ProtocolError(f"{self.describe()} sent an unexpected result for key {header.key} "
                                f"chunk {header.chunk} round {header.round}")
        return entry[1]

    def on_message(self, peer, header, payload):
        if header.op == Op.RESULT:
            with self.ready:
                entry = self.expected.pop((header.key, header.chunk, header.round), None)
                if entry is not None:
                    self._return_credit(entry)
            if entry is not None:
                if self.store.tracer:
                    self.store.tracer.stage("received", key=entry[0]._info.name, chunk=header.chunk,
                                            round=header.round)
                entry[0]._chunk_done()
        elif header.op == Op.RECEIVED:
            with self.ready:
                entry = self.expected.get((header.key, header.chunk, header.round))
                if entry is not None:
                    self._return_credit(entry)
        else:
            self.on_control(header, payload)

    def on_closed(self, peer, error):
        self.fail(ConnectionClosed(f"connection to {self.describe()} lost: {error or 'closed'}"))

    def fail(self, error):
        """Fail every operation that waits on this server; later calls fail at once."""
        with self.ready:
            if self.error is None:
                self.error = error
            entries = list(self.expected.values())
            self.expected.clear()
            self.queue.drain()
            self.ready.notify_all()
        with self.replied:
            self.replied.notify_all()
        for entry in entries:
            entry[0]._finish(self.error)

    def drop_key(self, wire):
        """Forget the results owed for a failed key, returning their credit."""
        with self.ready:
            for slot in [s for s in self.expected if s[0] == wire]:
                self._return_credit(self.expected.pop(slot))

    def _return_credit(self, entry):
        """The caller holds self.ready."""
        if entry[3]:
            entry[3] = False
            self.queue.finish(entry[2])
            self.ready.notify()

    def close(self):
        self.fail(ClosedError("the KVStore is closed"))
        if self.peer is not None:
            self.peer.close()
        if self.sender.is_alive():
            self.sender.join(5)


class EngineLink(_ServerLinkBase):
    """One server on the native data path (rdmakv/native/worker_engine.c): the engine's
    threads send our pushes and take the results in; this side hears the rest
    (the engine's events) and decides what a failure means."""

    def __init__(self, store, rank, address):
        super().__init__(store, rank, address)
        self.connection = None
        self.missing = {}             # (wire key, chunk) -> (round, workers the server said it waits for)
        self._lock = threading.Lock()

    def start(self, connection):
        self.connection = connection
        self.store._engine.start_link(self.rank, connection.fileno())
        self.send_json(Op.CONNECT, {"rank": self.store.rank})

    @property
    def connected(self):
        return self.connection is not None

    def send(self, op, payload=None, **fields):
        if isinstance(self.error, ClosedError):
            raise ConnectionClosed(f"send to {self.connection.peer}: connection already closed")
        length = 0 if payload is None else memoryview(payload).nbytes
        code, err = self.store._engine.send(self.rank, protocol.pack(op, length=length, **fields), payload)
        if code:
            raise engine_stream_error(code, err, "send to", self.connection.peer, self.store.config.timeout)

    def note_missing(self, header, missing):
        with self._lock:
            self.missing[(header.key, header.chunk)] = (header.round, missing)

    def owed(self, handle):
        """[(chunk index, the workers the server said it waits for, or None)] still owed for handle."""
        indices, _ = handle._op.owed(self.rank)
        wire = handle._info.wire
        with self._lock:
            told = [self.missing.get((wire, index)) for index in indices]
        return [(index, entry[1] if entry is not None and entry[0] == handle.round else None)
                for index, entry in zip(indices, told)]

    def on_event(self, event):
        """An event of this link's engine threads (the engine's event thread)."""
        _, kind, code, err, limit, fields, payload = event
        peer, timeout = self.connection.peer, self.store.config.timeout
        if kind == _t.EVENT_MESSAGE:
            try:
                self.on_control(protocol.Header(*fields[2:]), payload)
            except ProtocolError as exc:
                self._broken(exc)
        elif kind == _t.EVENT_SEND_FAILED:
            error = engine_stream_error(code, err, "send to", peer, timeout)
            self.fail(ConnectionClosed(f"sending to {self.describe()} failed: {error}"))
        else:
            self._broken(engine_read_error(code, err, limit, fields, self.describe(), peer, timeout))

    def _broken(self, error):
        """The connection cannot go on: say why (as a Peer's reader does) and fail what waits on it."""
        if isinstance(error, EndOfStream):
            log.debug("%s closed the connection", self.describe())
        elif self.error is None:
            closed_connection_warnings.warn(log, "connections closed with errors",
                                            "connection to server %d (%s) closed: %s",
                                            self.rank, self.connection.peer, error)
        self.fail(ConnectionClosed(f"connection to {self.describe()} lost: {error}"))
        self.connection.shut()        # stops the engine's reader, if the error was not its own

    def fail(self, error):
        """Fail every operation that waits on this server; later calls fail at once."""
        with self._lock:
            if self.error is None:
                self.error = error
        self.store._engine.fail_link(self.rank, _t.OUTCOME_LINK_FAILED)
        with self.replied:
            self.replied.notify_all()

    def close(self):
        self.fail(ClosedError("the KVStore is closed"))



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
        self.config = Config.load(**{"role": "worker", **settings})
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
        self._handles: set[Handle[Any]] = set()
        self._handles_pruned_at = 64
        self._fused_buffers: dict = {}      # (group, dtype) -> staging arrays free for the next round
        self._fused_layouts: dict = {}      # (dtype, ((key, shape), ...)) -> fused key name
        self._failed_wires: set[int] = set()    # wire keys a server refused
        self._barrier_number = 0
        self._barrier_done: dict[int, bool] = {}
        self._barrier_cond = threading.Condition()
        self._control = ControlLink(self.config, self.transport, "worker", self._on_control, self._on_lost)
        self._links = []
        self._engine = None           # the native data plane, where every link can use it
        self._engine_events = None    # the thread that hears what the engine's threads leave to Python
        try:
            host = netif.advertised_host(self.config)
            welcome = self._control.join(host, 0, self.config.worker_id)
            self.rank = welcome["rank"]
            self.num_workers = welcome["num_workers"]
            self.num_servers = welcome["num_servers"]
            self.local_rank = (self.config.local_rank if self.config.local_rank is not None
                               else welcome["local_rank"])
            self.local_size = welcome["local_size"]
            self.tracer = trace.make(self.config, "worker", self.rank)
            self._connect_servers(welcome["servers"])
        except BaseException:
            self._teardown()
            raise
        log.info("worker %d of %d connected to %d servers (%s; %s data path)", self.rank, self.num_workers,
                 self.num_servers, self.transport_reason, "native" if self._engine else "Python")
        _install_exit_hooks()
        _open_stores.add(self)

    def _connect_servers(self, servers):
        """Connect to every server, then run the data path on the native engine if
        every connection is one it speaks (TCP frames without a MAC) and nothing
        needs a per-chunk Python hook (a trace), else on Python threads."""
        connections = []
        secret = auth.load_secret(self.config)
        try:
            for server_host, port in servers:
                connections.append(auth.open_connection(self.transport, server_host, port, secret,
                                                        self.config.timeout, integrity=self.config.integrity))
            native = (self.config.engine == "native" and self.tracer is None
                      and all(type(c) is TcpConnection and c.frames_are_plain for c in connections))
            if native:
                credit = self.config.scheduling_credit * self.config.partition_bytes
                self._engine = _t.Engine(len(connections), credit, DIRECT_SEND_BYTES, self.config.timeout, self.rank)
                self._engine.set_spin(self.config.spin_us / 1e6)
                self._engine_events = threading.Thread(target=self._hear_engine, daemon=True,
                                                       name="rdmakv-engine-events")
                self._engine_events.start()
            while connections:
                rank = len(self._links)
                link = (EngineLink if native else ServerLink)(self, rank, servers[rank])
                self._links.append(link)
                link.start(connections.pop(0))
        finally:
            for connection in connections:
                connection.close()

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
        (the starting weights when the servers run an optimizer)."""
        array = as_array(value, "value", key=key)
        info = self._declare(key, array.dtype, array.shape)
        if self.rank == 0:
            flat = array.reshape(-1).view(np.uint8)
            for chunk in info.chunks:
                self._links[chunk.server].send(
                    Op.INIT, flat[chunk.offset:chunk.offset + chunk.nbytes],
                    dtype=info.dtype_code, key=info.wire, chunk=chunk.index)

    def declare(self, key: Key, shape: Sequence[int], dtype: npt.DTypeLike) -> None:
        """Declare key's shape and dtype without data (any thread, in any order)."""
        dtype = np.dtype(dtype)
        if dtype.name not in protocol.DTYPE_CODES:
            raise TypeError(f"dtype {dtype} is not summed by rdmakv; use one of {', '.join(protocol.DTYPE_CODES)}")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"shape {shape} has a negative dimension")
        self._declare(key, dtype, shape)

    def pushpull_async(self, key: Key, value: T, out: Optional[T] = None, priority: int = 0) -> Handle[T]:
        """Start summing value over all workers into out (default: into value); returns a Handle.
        value must not change until the handle is done."""
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
        return FusedGroup(self, keys, values, outs)

    def pushpull_many_async(self, keys: Sequence[Key], values: Sequence[Any], outs: Optional[Sequence[Any]] = None,
                            priority: int = 0) -> GroupHandle:
        """pushpull for many keys at once (a one-off fuse()); returns a
        GroupHandle whose wait() gives the results."""
        return FusedGroup(self, keys, values, outs).pushpull_async(priority)

    def pushpull_many(self, keys: Sequence[Key], values: Sequence[Any], outs: Optional[Sequence[Any]] = None,
                      priority: int = 0) -> list[Any]:
        """The sums of many keys at once (see pushpull_many_async)."""
        return self.pushpull_many_async(keys, values, outs, priority).wait()

    def _fused_layout(self, dtype, members):
        """The wire name of the fused key for these (key, source, target) members."""
        signature = (dtype, tuple((key, source.shape) for key, source, _ in members))
        group = self._fused_layouts.get(signature)
        if group is None:
            names = "|".join(f"{key_name(key)}{list(shape)}" for key, shape in signature[1])
            group = self._fused_layouts[signature] = "fused:" + hashlib.blake2b(names.encode(),
                                                                                digest_size=12).hexdigest()
        return group

    def _fused_pushpull(self, group, dtype, sources, targets, size, priority):
        with self._lock:
            pool = self._fused_buffers.setdefault((group, dtype), [])
            staging = pool.pop() if pool else np.empty(size, dtype)
        _t.pack(sources, staging)
        handle = self.pushpull_async(group, staging, priority=priority)

        def unpack(done):
            if done.exception() is None:
                _t.unpack(staging, targets)
            with self._lock:
                pool.append(staging)

        handle.add_done_callback(unpack)
        return handle

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
        limit = self.config.timeout if timeout is None else timeout
        with self._barrier_cond:
            self._barrier_number += 1
            number = self._barrier_number
        self._control.send(Op.BARRIER, round=number)
        with self._barrier_cond:
            if not self._barrier_cond.wait_for(lambda: number in self._barrier_done or self._failure, limit):
                raise PeerTimeout(f"barrier {number}: not every worker arrived within {limit:g} s")
            if self._failure is not None:
                raise self._failure
            del self._barrier_done[number]

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
            if handle._expired is not None and not handle.done():   # a wait already gave up on it
                unfinished = unfinished or handle._expired
            elif not handle._wait_done(deadline - time.monotonic()):
                unfinished = unfinished or handle._timed_out(limit)
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
        if _unhandled_exit is None:
            try:
                self.close()
            except RdmaKVError as exc:
                log.error("worker %d: closing at exit: %s", self.rank, exc)
            return
        self._teardown(RdmaKVError(f"exited with an unhandled {type(_unhandled_exit).__name__}: "
                                   f"{_unhandled_exit}"))

    def _teardown(self, leaving_because=None):
        """Release everything.  The one place a worker leaving a failed job says why:
        to the scheduler (which fails the job naming this worker and the reason,
        unless it already failed) and to every server, or the other workers would
        only hear that this worker left.  The reason is the job's failure as this
        worker heard it, else leaving_because (an operation that never completed,
        an unhandled exception), else a server link's error."""
        self._closed = True
        _open_stores.discard(self)
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

    # ---- optimizer support (used by rdmakv.mxnet) --------------------------
    def _set_optimizer(self, description):
        payload = protocol.encode_json(description)
        for link in self._links:
            link.request(Op.SET_OPTIMIZER, payload, self.config.timeout)

    def _dump_optimizer_states(self):
        if self._engine is None:
            return [link.request(Op.GET_STATES, None, self.config.timeout) for link in self._links]
        states = []
        for link, (nbytes, count) in zip(self._links, self._declared_per_server()):
            self._engine.allow_states(link.rank, protocol.state_limit(nbytes, count))   # only while asked
            try:
                states.append(link.request(Op.GET_STATES, None, self.config.timeout))
            finally:
                self._engine.allow_states(link.rank, 0)
        return states

    def _declared_per_server(self):
        """(bytes, chunks) of the keys declared, per server."""
        totals = [[0, 0] for _ in self._links]
        with self._lock:
            for info in self._keys.values():
                for chunk in info.chunks:
                    totals[chunk.server][0] += chunk.nbytes
                    totals[chunk.server][1] += 1
        return totals

    def _load_optimizer_states(self, states):
        if len(states) != len(self._links):
            raise ValueError(f"the saved states are for {len(states)} servers, this cluster has {len(self._links)}")
        for link, data, (nbytes, count) in zip(self._links, states, self._declared_per_server()):
            limit = protocol.state_limit(nbytes, count)
            if len(data) > limit:
                raise ValueError(f"the saved optimizer state for server {link.rank} has {len(data)} bytes, more "
                                 f"than the {limit} its {count} declared chunks allow: init() the keys "
                                 f"before loading their states")
        for link, data in zip(self._links, states):
            link.request(Op.SET_STATES, data, self.config.timeout)

    # ---- internals ---------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise ClosedError("the KVStore is closed")
        if self._failure is not None:
            raise self._failure

    def _declare(self, key, dtype, shape):
        self._check_open()
        # Keys are only ever added, once announced: a known one needs no lock.
        info = self._keys.get(key) if type(key) is str or type(key) is int else None
        if info is None:
            info = self._add_key(key, dtype, shape)
        if info.dtype != dtype or info.shape != shape:
            raise ValueError(f"key {key_name(key)!r} was declared as {info.dtype}{list(info.shape)}, "
                             f"now used with {dtype}{list(shape)}")
        return info

    def _add_key(self, key, dtype, shape):
        name = key_name(key)
        with self._lock:
            info = self._keys.get(key)
            if info is not None:      # another thread declared it meanwhile
                return info
            wire = wire_key(key)
            if wire in self._wire_keys:
                raise ValueError(f"keys {self._wire_keys[wire].name!r} and {name!r} collide; rename one")
            nbytes = math.prod(shape) * dtype.itemsize
            partition_bytes = min(self.config.partition_bytes, protocol.MAX_CHUNK_BYTES)
            size = partition.chunk_size(nbytes, dtype.itemsize, partition_bytes)
            count = partition.chunk_count(nbytes, size)
            if count > protocol.MAX_KEY_CHUNKS:
                raise ValueError(f"key {name!r} ({nbytes} bytes) would be split into {count} chunks of at most "
                                 f"{partition_bytes} bytes; a key may have at most {protocol.MAX_KEY_CHUNKS} "
                                 f"(raise RDMAKV_PARTITION_BYTES)")
            layout = protocol.declaration(wire, name, dtype.name, shape, size)
            chunks = partition.place(wire, partition.pieces(nbytes, size), self.num_servers)
            info = KeyInfo(key, wire, len(self._keys), dtype, shape, nbytes, chunks)
            # Every server sees every declaration, so they can check that all workers agree.
            if self._engine is not None:
                info.engine_key = self._engine.add_key(wire, info.order, info.dtype_code,
                                                       [c.offset for c in chunks], [c.nbytes for c in chunks],
                                                       [c.server for c in chunks])
            for link in self._links:
                link.send(Op.DECLARE, layout)
            self._wire_keys[wire] = info
            self._keys[key] = info
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
            return self._submit_native(info, source, target, result_obj, int(priority), flags)
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

    def _submit_native(self, info, source, target, result_obj, priority, flags):
        engine = self._engine
        engine.reap()
        operation = engine.submit(info.engine_key, None if flags & FLAG_NO_DATA else source, target, priority, flags)
        handle = NativeHandle(self, info, operation, result_obj, priority, flags)
        with self._lock:
            self._handles.add(handle)
            if len(self._handles) >= self._handles_pruned_at:
                # Handles nobody waits for (done-callbacks only) leave here, in batches.
                self._handles = {h for h in self._handles if not h.done()}
                self._handles_pruned_at = max(64, 2 * len(self._handles))
        return handle

    def _start(self, handle):
        info = handle._info
        source = handle._value.reshape(-1).view(np.uint8)
        target = handle._out.reshape(-1).view(np.uint8)
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
            handle._finish(exc)

    def _advance(self, info, handle):
        """handle is done: start the key's next round, if one waits."""
        with self._lock:
            self._handles.discard(handle)
            if info.active is not handle:
                return
            info.active = info.waiting.popleft() if info.waiting else None
            following = info.active
        if following is not None:
            if following.done():
                self._advance(info, following)
            elif info.error is not None:
                following._finish(info.error)
            else:
                self._start(following)

    def _owing(self, handle):
        """Which servers still owe results for handle, and for which chunks."""
        owing = []
        for link in self._links:
            entries = link.owed(handle)
            if entries:
                chunks = sorted(index for index, _ in entries)
                shown = ", ".join(map(str, chunks[:8])) + (", ..." if len(chunks) > 8 else "")
                missing = sorted({rank for _, ranks in entries for rank in ranks or ()})
                blame = ""
                if missing:
                    who = ", ".join(f"worker {rank}" for rank in missing)
                    blame = f"; it has not received the push of {who} for this round"
                owing.append(f"{link.describe()} (chunks {shown}{blame})")
        return owing

    def _fail_key(self, wire, error):
        with self._lock:
            info = self._wire_keys.get(wire)
            if info is None:
                return
            if info.error is None:
                info.error = error
            self._failed_wires.add(wire)
            pending = [h for h in self._handles if h._info is info]
        log.error("key %r failed: %s", info.name, error)
        if self._engine is not None:
            self._engine.fail_key(info.engine_key)
            return
        for link in self._links:
            link.drop_key(wire)
        for handle in pending:
            handle._finish(info.error)

    def _on_control(self, header, obj):
        if header.op == Op.BARRIER_DONE:
            with self._barrier_cond:
                self._barrier_done[header.round] = True
                self._barrier_cond.notify_all()
        elif header.op == Op.ERROR:
            self._on_lost(RemoteError(f"the scheduler reports: {protocol.peer_text(obj, default='job failed')}"))

    def _on_lost(self, error):
        if self._closed:
            return
        if not isinstance(error, RemoteError):
            error = ConnectionClosed(f"lost the scheduler: {error}")
        if self._failure is None:     # the first report says why; the closing link that follows does not
            self._failure = error
        with self._barrier_cond:
            self._barrier_cond.notify_all()
        for link in self._links:
            link.fail(error)
