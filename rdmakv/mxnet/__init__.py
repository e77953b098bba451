"""MXNet KVStore backed by rdmakv: ``import rdmakv.mxnet``, then
``mx.kv.create('dist_sync_rdmakv')`` or ``gluon.Trainer(..., kvstore='dist_sync_rdmakv')``;
``'dist_async_rdmakv'`` (or ``'rdmakv_async'``) for the asynchronous mode, as MXNet's ``dist_async``.

Implements ``mxnet.kvstore.KVStoreBase`` (the interface BytePS implements, see
``python/mxnet/kvstore/base.py`` of MXNet 1.9.1).  ``pushpull`` and
``broadcast`` return at once: each is one operation in MXNet's dependency
engine (see :mod:`rdmakv.mxnet.engine`) that reads ``value`` and writes ``out``,
so reading ``out`` - or running the next operator on it - waits for the
network, and a failure is raised there as ``MXNetError``.

Unlike BytePS, the servers can run the optimizer (``set_optimizer``;
``is_capable('optimizer')`` is True): Gluon's ``Trainer(update_on_kvstore=True)``
then pushes gradients and pulls updated weights.  The optimizer travels as a
declarative description (:mod:`rdmakv.mxnet.optimizer`), never pickled.

Importing this module without MXNet works; nothing is registered then.
"""
from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import struct
from typing import TYPE_CHECKING, Any, List, Optional, Union

import numpy as np

from rdmakv.core import compression as _compression
from rdmakv.core.errors import ClosedError, ConfigError
from rdmakv.mxnet import optimizer as _optimizer

try:
    # Through the optimizer's import: a server imports this package for its optimizer,
    # and a plain `import mxnet` there would start MXNet's own parameter server.
    _mx = _optimizer._mxnet()
    from mxnet.kvstore import KVStoreBase as _Base
except ImportError:     # MXNet is optional: the module imports, nothing registers
    _mx = None
    _Base = object

if TYPE_CHECKING:
    from mxnet.ndarray import NDArray
    from mxnet.optimizer import Optimizer

    from rdmakv.worker.kvstore import Key

    Values = Union[NDArray, List[NDArray]]     # a list is summed locally first, as for several devices

__all__ = ["RdmaKV", "RdmaKVAsync", "NAMES", "ASYNC_NAMES"]
log = logging.getLogger("rdmakv.mxnet")

# The names mx.kv.create() and the `kvstore=` argument of gluon.Trainer and
# Module.fit take.  MXNet creates no store at all for a name without "dist"
# when a worker has one device, so the name to use is the second one; the
# first works too because this module makes those APIs create it (see below).
NAMES = ("rdmakv", "dist_sync_rdmakv")
ASYNC_NAMES = ("rdmakv_async", "dist_async_rdmakv")   # RDMAKV_MODE=async: every node must run it

STATES_MAGIC = b"RDMAKVMX"
_STATES_PREFIX = struct.Struct("<8sIQ")     # magic, version, header length
STATES_VERSION = 1


class _UpdaterInfo:
    """What ``Trainer.load_states`` reads back: ``kvstore._updater.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


class _ProcessWorker:
    """A worker connection and the MXNet-side state that every RdmaKV on it
    shares.  mx.kv.create() is often called more than once in a process (a
    script creates one store to learn its rank, then Trainer or Module.fit
    create another from the name): all get the process's one worker, which
    closes when the last of them is closed, or at interpreter exit."""

    _process_wide = None

    def __init__(self, kvstore, settings):
        if kvstore is None:
            from rdmakv.worker.kvstore import KVStore
            kvstore = KVStore(**settings)
        self.kv = kvstore
        self.users = 0
        self.declared = {}          # key -> (shape, dtype)
        self.sequence = {}          # key -> 1-element NDArray ordering its operations
        self.initialized = set()    # keys whose servers hold a starting weight
        self.optimizer = None
        self.updater = None
        # Registered after the core store's own hook, so it runs first: the
        # engine operations still queued must reach the store before it closes.
        atexit.register(self.close_at_exit)

    @classmethod
    def shared(cls, mode):
        worker = cls._process_wide
        if worker is None or worker.kv._closed or worker.kv._pid != os.getpid():
            worker = cls._process_wide = cls(None, {"mode": mode})
        _check_mode(worker.kv, mode)
        return worker

    def release(self):
        self.users -= 1
        if self.users == 0:
            _mx.nd.waitall()
            self.kv.close()

    def close_at_exit(self):
        if self.kv._closed or self.kv._pid != os.getpid():
            return
        try:
            _mx.nd.waitall()
        except _mx.base.MXNetError as exc:     # a result nobody read failed: say so
            log.error("at exit: %s", exc)
        self.kv.close_at_exit()


class RdmaKV(_Base):
    """MXNet KVStore over rdmakv.  Registered as ``'dist_sync_rdmakv'`` and ``'rdmakv'``
    (RdmaKVAsync: ``'dist_async_rdmakv'`` and ``'rdmakv_async'``).

    Keys are ints or strs, as in MXNet.  Every worker must use its keys in the
    same order the first time (as with BytePS); values are dense NDArrays.
    ``type`` is ``'dist_sync_rdmakv'``: MXNet tests ``'dist' in kv.type`` to
    treat a store as distributed (for example, Gluon then refuses a batch size
    change that a server-side optimizer would not see) and ``'_sync'`` to
    scale gradients by the number of workers in Module.
    """

    mode = "sync"                     # RDMAKV_MODE: this class's, whatever the environment says

    def __init__(self, kvstore=None, **settings):
        if _mx is None:
            raise ImportError("rdmakv.mxnet needs MXNet (pip install mxnet==1.9.1)")
        if kvstore is None and not settings:
            self._worker = _ProcessWorker.shared(self.mode)
        else:
            if kvstore is not None:
                _check_mode(kvstore, self.mode)
            self._worker = _ProcessWorker(kvstore, {**settings, "mode": self.mode})
        self._worker.users += 1
        self._closed = False

    @property
    def _kv(self):
        if self._closed:
            raise ClosedError("this rdmakv MXNet KVStore is closed")
        return self._worker.kv

    @property
    def _updater(self):
        return self._worker.updater

    # -- properties -----------------------------------------------------------
    @property
    def type(self) -> str:
        return "dist_%s_rdmakv" % self.mode

    @property
    def rank(self) -> int:
        return self._worker.kv.rank       # facts, still readable after close()

    @property
    def local_rank(self) -> int:
        return self._worker.kv.local_rank

    @property
    def num_workers(self) -> int:
        return self._worker.kv.num_workers

    @staticmethod
    def is_capable(capability: str) -> bool:
        if not isinstance(capability, str):
            raise TypeError("capability must be a str")
        if capability.lower() in (_Base.OPTIMIZER, "gradient_compression"):
            return True
        raise ValueError("Unknown capability: %s" % capability)

    # -- data ---------------------------------------------------------------
    def init(self, key: Key, value: Values) -> None:
        """Declare ``key``; from rank 0 also store ``value`` on the servers as
        the starting weight for a server-side optimizer.  Blocks until
        ``value`` is computed."""
        value = _single(value, "value")
        self._declare(key, value)
        self._kv.init(key, value.asnumpy())
        self._worker.initialized.add(key)

    def broadcast(self, key: Key, value: Values, out: Optional[Values], priority: int = 0) -> None:
        """Copy rank 0's ``value`` into ``out`` (NDArray or list) on every
        worker; ``out=None`` writes into ``value``.  Also makes ``value`` the
        starting weight on the servers (what Gluon's Trainer relies on)."""
        value = _single(value, "value")
        outs = _outputs(out, value)
        if key not in self._worker.initialized:
            self.init(key, value)
        target = _staging(outs[0], value)
        src = value if target is not value else None
        self._enqueue(lambda v, o: self._kv.broadcast_async(key, v, out=o, priority=priority),
                      key, src, target, priority, "broadcast")
        _fan_out(target, outs)

    def pushpull(self, key: Key, value: Values, out: Optional[Values] = None, priority: int = 0) -> None:
        """Sum ``value`` (NDArray, or a list summed locally first) over all
        workers into ``out`` (NDArray or list; default: every ``value``).
        With an optimizer set, ``out`` receives the updated weight instead."""
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ValueError("pushpull needs at least one value")
        for v in values:
            _check_dense(v, "value")
        first = values[0]
        for v in values[1:]:
            if v.shape != first.shape or v.dtype != first.dtype:
                raise ValueError("values for key %r differ in shape or dtype" % (key,))
        outs = _outputs(out, None) if out is not None else list(values)
        for o in outs:
            if o.shape != first.shape:
                raise ValueError("out has shape %s, value %s" % (o.shape, first.shape))
        if self._worker.optimizer is not None and key not in self._worker.initialized:
            raise ValueError("key %r has no weight on the servers: call init() or broadcast() "
                             "on it before pushpull() when an optimizer is set" % (key,))
        self._declare(key, first)
        if len(values) > 1:
            ctx = first.context
            reduced = _mx.nd.add_n(*[v.as_in_context(ctx) for v in values])
        else:
            reduced = first
        target = _staging(outs[0], reduced)
        src = None if target is reduced else reduced
        self._enqueue(lambda v, o: self._kv.pushpull_async(key, v, out=o, priority=priority),
                      key, src, target, priority, "pushpull")
        _fan_out(target, outs)

    def _declare(self, key, value):
        layout = (tuple(value.shape), np.dtype(value.dtype))
        known = self._worker.declared.get(key)
        if known is None:
            # Declared here, on the calling thread, so every worker declares in
            # program order; engine operations may run in another order.
            self._kv.declare(key, *layout)
            self._worker.declared[key] = layout
        elif known != layout:
            raise ValueError("key %r was used as %s%s, now %s%s"
                             % (key, known[1], list(known[0]), layout[1], list(layout[0])))

    def _enqueue(self, start, key, src, target, priority, what):
        """One engine operation: read src (None: in place), write target."""
        from rdmakv.mxnet import engine as _mxengine
        from rdmakv.worker.handles import NativeHandle

        # The core numbers a key's rounds in the order operations reach it, and
        # every worker must number them alike; operations on different arrays
        # may run in any order in the engine, so each key's operations also
        # write one per-key array, which makes the engine run them in program
        # order.
        sequence = self._worker.sequence.get(key)
        if sequence is None:
            sequence = self._worker.sequence[key] = _mx.nd.zeros((1,), ctx=_mx.cpu())

        def run(done):
            dst = _mxengine.numpy_view(target)
            handle = start(dst if src is None else _mxengine.numpy_view(src),
                           None if src is None else dst)
            if isinstance(handle, NativeHandle) and isinstance(done, _mxengine.Completion):
                # The engine thread that finishes a successful op completes MXNet's
                # operator itself, never waiting for the GIL; a failure's message is Python's.
                callback, engine, param, fail = done.hand_over()
                handle.add_native_completion(callback, engine, param, lambda h: fail(_outcome(h)))
            else:             # the Python data path, or NaiveEngine (done is then Python's)
                handle.add_done_callback(lambda h: done(_outcome(h)))

        # The handle keeps the arrays' views until the op is done: no deleter needed.
        _mxengine.push_async(run, const=[] if src is None else [src], mutable=[target, sequence],
                             priority=priority, name="rdmakv_%s" % what, native_done=True)

    # -- optimizer ------------------------------------------------------------
    def set_optimizer(self, optimizer: Optimizer) -> None:
        """Run ``optimizer`` on the servers (see rdmakv.mxnet.optimizer.describe for
        what can run there).  Returns when every server has it."""
        description = _optimizer.describe(optimizer)
        self._kv.server_optimizer.set(description)
        self._worker.optimizer = optimizer
        self._worker.updater = _UpdaterInfo(optimizer)

    def save_optimizer_states(self, fname: str, dump_optimizer: bool = False) -> None:
        """Save the servers' optimizer states (and with ``dump_optimizer``
        the optimizer's description) to ``fname``, in rdmakv's own format."""
        if self._worker.optimizer is None:
            raise RuntimeError("no optimizer is set on this KVStore")
        _mx.nd.waitall()            # every update this worker started has landed
        blobs = self._kv.server_optimizer.dump_states()
        header = {"servers": [len(b) for b in blobs],
                  "optimizer": _optimizer.describe(self._worker.optimizer) if dump_optimizer else None}
        raw = json.dumps(header, allow_nan=False).encode()
        with open(fname, "wb") as f:
            f.write(_STATES_PREFIX.pack(STATES_MAGIC, STATES_VERSION, len(raw)))
            f.write(raw)
            for blob in blobs:
                f.write(blob)

    def load_optimizer_states(self, fname: str) -> None:
        """Load states saved by save_optimizer_states into the servers; if the
        file holds an optimizer, it replaces the current one."""
        with open(fname, "rb") as f:
            data = f.read()
        description, blobs = _parse_states_file(data, fname)
        if description is not None:
            optimizer = _optimizer.make_optimizer(description)
            if self._worker.optimizer is not None:
                optimizer.param_dict = self._worker.optimizer.param_dict
            self.set_optimizer(optimizer)
        elif self._worker.optimizer is None:
            raise RuntimeError("%s holds no optimizer and none is set on this KVStore" % fname)
        _mx.nd.waitall()
        self._kv.server_optimizer.load_states(blobs)

    def set_gradient_compression(self, compression_params: Any) -> None:
        """Compress the gradients of the float32 keys declared from now on, as MXNet's dist
        kvstore does: ``{'type': '2bit', 'threshold': t}`` (threshold 0.5 by default)
        quantizes each gradient to -t, 0 or +t with the residual kept on this worker; the
        servers decode and sum, and the pull is not compressed.  BytePS's
        ``compression_params`` names work too (rdmakv/core/compression.py).  Call it before
        the first init or pushpull, as Gluon's Trainer and Module do."""
        if not isinstance(compression_params, dict) or not compression_params:
            raise _mx.base.MXNetError("Required parameter type of string is not presented: "
                                      "compression_params must be a dict like {'type': '2bit', 'threshold': 0.5}")
        if self._worker.declared:
            raise _mx.base.MXNetError("set_gradient_compression must be called before any key is initialized "
                                      "or pushed (keys %s are declared already)"
                                      % sorted(map(str, self._worker.declared)))
        try:
            self._kv.set_compression(_compression.parse(compression_params))
        except (_compression.CompressionError, ConfigError) as exc:
            raise _mx.base.MXNetError(str(exc)) from None

    # -- lifetime -------------------------------------------------------------
    def barrier(self) -> None:
        _mx.nd.waitall()
        self._kv.barrier()

    def close(self) -> None:
        """Release this store; the process's worker connection closes with the last
        one (or at exit, for stores never closed, as MXNet and BytePS scripts do)."""
        if self._closed:
            return
        self._closed = True
        self._worker.release()

    def __enter__(self) -> RdmaKV:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _outcome(handle):
    return handle.exception()          # handed to MXNet, raised where out is read


def _check_dense(arr, what):
    if _mx is None or not isinstance(arr, _mx.nd.NDArray):
        raise TypeError("%s must be an MXNet NDArray, got %s" % (what, type(arr).__name__))
    if arr.stype != "default":
        raise ValueError("%s is %s; rdmakv sums dense NDArrays only" % (what, arr.stype))
    return arr


def _single(value, what):
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError("%s must be one NDArray, got %d" % (what, len(value)))
        value = value[0]
    return _check_dense(value, what)


def _outputs(out, default):
    if out is None:
        return [default]
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if not outs:
        raise ValueError("out is an empty list")
    for o in outs:
        _check_dense(o, "out")
    return outs


def _staging(out, like):
    """The array the network writes: ``out`` itself when it is a CPU array of
    the same dtype, else a CPU staging array copied to ``out`` afterwards."""
    if out.context.device_type in ("cpu", "cpu_pinned", "cpu_shared") \
            and out.dtype == like.dtype and out.shape == like.shape:
        return out
    if out.size != like.size:
        raise ValueError("out has %d elements, value %d" % (out.size, like.size))
    return _mx.nd.empty(like.shape, ctx=_mx.cpu(), dtype=like.dtype)


def _fan_out(target, outs):
    for o in outs:
        if o is not target:
            target.reshape(o.shape).copyto(o)   # engine ops: ordered after the transfer


class RdmaKVAsync(RdmaKV):
    """The asynchronous mode (RDMAKV_MODE=async on every node): the servers apply each
    push as it arrives, through the optimizer if one is set, as MXNet's ``dist_async``;
    a pushpull returns the value then, without waiting for the other workers.
    ``type`` is ``'dist_async_rdmakv'``: Gluon's Trainer then insists on
    ``update_on_kvstore``, and Module does not scale gradients by the number of workers."""

    mode = "async"

    @staticmethod
    def is_capable(capability: str) -> bool:
        if isinstance(capability, str) and capability.lower() == "gradient_compression":
            return False              # the servers apply each push alone
        return RdmaKV.is_capable(capability)

    def init(self, key: Key, value: Values) -> None:
        """As MXNet's dist kvstore does, every worker calls it and it ends with a barrier:
        pushes are applied as they arrive, so rank 0's starting value must be on the
        servers before any worker's first push."""
        super().init(key, value)
        self.barrier()


def _check_mode(kvstore, mode):
    if kvstore.config.mode != mode:
        raise ValueError("this process's rdmakv worker runs in %s mode (RDMAKV_MODE) and this store is %s: use "
                         "one kind of rdmakv store per process ('rdmakv' / 'dist_sync_rdmakv' sync, "
                         "'rdmakv_async' / 'dist_async_rdmakv' async)" % (kvstore.config.mode, mode))


def _parse_states_file(data, fname):
    where = "optimizer states file %s" % fname
    if len(data) < _STATES_PREFIX.size:
        raise ValueError("%s is too short" % where)
    magic, version, hlen = _STATES_PREFIX.unpack_from(data)
    if magic != STATES_MAGIC:
        raise ValueError("%s was not written by rdmakv (bad magic %r)" % (where, magic))
    if version != STATES_VERSION:
        raise ValueError("%s has version %d; this build reads %d" % (where, version, STATES_VERSION))
    start = _STATES_PREFIX.size
    if start + hlen > len(data):
        raise ValueError("%s is truncated" % where)
    try:
        header = json.loads(data[start:start + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError("%s: bad header: %s" % (where, exc)) from None
    if not isinstance(header, dict) or set(header) != {"servers", "optimizer"} \
            or not isinstance(header["servers"], list) \
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                       for n in header["servers"]):
        raise ValueError("%s: bad header" % where)
    offset = start + hlen
    if offset + sum(header["servers"]) != len(data):
        raise ValueError("%s: sizes do not add up to the file's length" % where)
    blobs = []
    for n in header["servers"]:
        blobs.append(data[offset:offset + n])
        offset += n
    return header["optimizer"], blobs


def _creating_named_stores(create_kvstore):
    """Wrap MXNet's private model._create_kvstore, which gluon.Trainer and
    Module.fit call with their `kvstore` argument, so that our names always
    create a store (MXNet skips any name without "dist" on one device)."""
    @functools.wraps(create_kvstore)
    def create(kvstore, num_device, arg_params):
        if isinstance(kvstore, str) and kvstore.lower() in NAMES + ASYNC_NAMES:
            kvstore = _mx.kv.create(kvstore)
        return create_kvstore(kvstore, num_device, arg_params)
    create.rdmakv_wrapped = create_kvstore
    return create


if _mx is not None:
    for _name in NAMES:
        _Base.kv_registry[_name] = RdmaKV
    for _name in ASYNC_NAMES:
        _Base.kv_registry[_name] = RdmaKVAsync
    from mxnet import model as _model
    from mxnet.gluon import trainer as _trainer
    from mxnet.module import module as _module_api
    for _module in (_model, _trainer, _module_api):
        if not hasattr(_module._create_kvstore, "rdmakv_wrapped"):
            _module._create_kvstore = _creating_named_stores(_module._create_kvstore)
