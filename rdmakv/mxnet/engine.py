"""Run Python work inside MXNet's dependency engine (ctypes, MXNet 1.9.1 C API).

:func:`push_async` enqueues ``fn`` with ``MXEnginePushAsyncND``: the engine
runs ``fn(done)`` on one of its worker threads once every ``const`` NDArray has
been written and no one else reads or writes a ``mutable`` one.  ``fn`` starts
the real work (a network transfer) and returns; whoever finishes the work calls
``done()`` - or ``done(error)`` - later, from any thread.  Until then readers
of the ``mutable`` arrays (``asnumpy()``, the next operator) wait inside MXNet,
and writers of the ``const`` arrays wait too, so the Python thread that pushed
never blocks.

C API facts this relies on (``include/mxnet/c_api.h`` and ``engine.h`` of
1.9.1, ``src/c_api/c_api.cc``, ``src/engine/threaded_engine.cc``):

* ``EngineAsyncFunc`` is ``void (*)(void* rctx, void* on_complete, void* param)``.
  ``on_complete`` points to an ``engine::CallbackOnComplete`` that lives on
  the engine's stack only during the call: three pointers ``callback_``,
  ``engine_``, ``param_``; calling it means ``callback_(engine_, param_,
  const dmlc::Error* error)``.  So the three pointers are copied during the
  call, and called later.
* A non-null ``error`` is copied into the operator's exception
  (``std::make_exception_ptr(*error)``), stored on every mutable var, and
  rethrown - as ``MXNetError`` in Python - by the next wait on those vars (and
  by ``waitall``).  ``dmlc::Error`` adds nothing to ``std::runtime_error``, so
  a ``std::runtime_error`` built with libstdc++'s exported constructor carries
  the message; it is destroyed right after the call returns.
* ``func_param`` is handed to ``deleter`` when the engine drops the operator,
  which is where this module forgets ``fn`` and the arrays.  The engine drops
  it inside ``on_complete``, on the thread that calls it; with a null
  ``deleter`` nothing is called (``native_done``: that thread is native and
  must not wait for the GIL).
* MXNet's ``NaiveEngine`` (``MXNET_ENGINE_TYPE=NaiveEngine``) requires an async
  function to complete before it returns; there ``fn``'s completion is waited
  for on the engine's calling thread, and since ``NaiveEngine`` ignores the
  error argument, a failure is raised by ``push_async`` itself.
"""
import ctypes
import ctypes.util
import itertools
import logging
import os
import threading

import numpy as np

_log = logging.getLogger(__name__)

_ASYNC_FUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_ON_COMPLETE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


class _CallbackOnComplete(ctypes.Structure):
    """Layout of mxnet::engine::CallbackOnComplete (engine.h)."""
    _fields_ = [("callback", ctypes.c_void_p), ("engine", ctypes.c_void_p),
                ("param", ctypes.c_void_p)]


class _Context(ctypes.Structure):
    """Layout of mxnet::Context: DeviceType dev_type; int32_t dev_id."""
    _fields_ = [("dev_type", ctypes.c_int), ("dev_id", ctypes.c_int32)]


# mxnet::FnProperty (engine.h)
PROPERTIES = {"normal": 0, "cpu_prioritized": 3}

_CPU_DEVICE_TYPES = ("cpu", "cpu_pinned", "cpu_shared")


class _Op:
    __slots__ = ("fn", "arrays", "name", "error", "native_done")

    def __init__(self, fn, arrays, name, native_done):
        self.fn = fn
        self.arrays = arrays
        self.name = name
        self.error = None
        self.native_done = native_done


_pending = {}
_ids = itertools.count(1)
# Operator names as C strings, kept for good: MXNet keeps the pointer for the operator's
# life (ThreadedOpr::opr_name), which may outlast what _pending holds (native_done).
_names = {}
_pending_lock = threading.Lock()


def pending_count():
    """Operations pushed whose engine operator has not been released yet."""
    with _pending_lock:
        return len(_pending)


# -- std::runtime_error for error propagation -------------------------------

def _load_runtime_error():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
        ctor = lib["_ZNSt13runtime_errorC1EPKc"]     # runtime_error(const char*)
        dtor = lib["_ZNSt13runtime_errorD1Ev"]       # ~runtime_error()
    except (OSError, AttributeError) as exc:
        return None, None, str(exc)
    ctor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ctor.restype = None
    dtor.argtypes = [ctypes.c_void_p]
    dtor.restype = None
    return ctor, dtor, None


_error_ctor, _error_dtor, error_propagation_unavailable = _load_runtime_error()
"""None when failures can be propagated into MXNet, else why not."""


def _message(error):
    if isinstance(error, BaseException):
        text = "%s: %s" % (type(error).__name__, error)
    else:
        text = str(error)
    return text.encode("utf-8", "replace").replace(b"\0", b"?")


class Completion:
    """The ``done`` passed to an engine function: call it exactly once, from
    any thread, with nothing on success or with an exception or message on
    failure."""
    __slots__ = ("_callback", "_engine", "_param", "_lock", "called", "name")

    def __init__(self, raw, name):
        self._callback = raw.callback
        self._engine = raw.engine
        self._param = raw.param
        self._lock = threading.Lock()
        self.called = False
        self.name = name

    def __call__(self, error=None):
        self._take()
        self._complete(error)

    def hand_over(self):
        """For native code that completes the operation without Python: mark this
        completion called and return MXNet's ``(callback, engine, param)``, which
        that code calls as ``callback(engine, param, NULL)`` on success, and a
        function that completes it with an error instead (one of the two, once)."""
        self._take()
        return self._callback or 0, self._engine or 0, self._param or 0, self._complete

    def _take(self):
        with self._lock:
            if self.called:
                raise RuntimeError("engine operation %r completed twice" % self.name)
            self.called = True

    def _complete(self, error):
        callback = _ON_COMPLETE(self._callback)
        if error is None:
            callback(self._engine, self._param, None)
            return
        if _error_ctor is None:
            _log.error("engine operation %r failed, but MXNet cannot be told (%s): %s",
                       self.name, error_propagation_unavailable, error)
            callback(self._engine, self._param, None)
            return
        storage = (ctypes.c_void_p * 8)()   # sizeof(std::runtime_error) is 16
        _error_ctor(ctypes.addressof(storage), _message(error))
        try:
            callback(self._engine, self._param, ctypes.addressof(storage))
        finally:
            _error_dtor(ctypes.addressof(storage))


def _naive_engine():
    return os.environ.get("MXNET_ENGINE_TYPE", "") == "NaiveEngine"


@_ASYNC_FUNC
def _run(rctx, on_complete, param):
    # Called by an engine thread; nothing may escape (a ctypes callback that
    # raises would leave the operator incomplete forever).
    try:
        with _pending_lock:
            op = _pending[param]
            if op.native_done:       # no deleter will come: forget it now
                del _pending[param]
        done = Completion(_CallbackOnComplete.from_address(on_complete), op.name)
    except BaseException:   # pragma: no cover - would be a bug here
        _log.exception("rdmakv engine trampoline failed before the operation started")
        return
    if _naive_engine():
        _run_synchronously(op, done)
        return
    try:
        op.fn(done)
    except BaseException as exc:
        if not done.called:
            done(exc)
        else:
            _log.exception("engine operation %r raised after completing", op.name)


def _run_synchronously(op, done):
    finished = threading.Event()
    outcome = []

    def local_done(error=None):
        if finished.is_set():
            raise RuntimeError("engine operation %r completed twice" % op.name)
        outcome.append(error)
        finished.set()

    try:
        op.fn(local_done)
    except BaseException as exc:
        if not finished.is_set():
            local_done(exc)
    finished.wait()
    # NaiveEngine ignores the error argument of on_complete; push_async
    # raises it instead (NaiveEngine runs the push synchronously).
    op.error = outcome[0]
    done()


@_DELETER
def _delete(param):
    with _pending_lock:
        _pending.pop(param, None)


def _lib():
    from mxnet.base import _LIB
    return _LIB


def push_async(fn, const=(), mutable=(), *, priority=0, name="rdmakv", prop="cpu_prioritized",
               native_done=False):
    """Enqueue ``fn(done)`` in MXNet's engine; return at once.

    ``const`` NDArrays are read by ``fn``'s work and ``mutable`` ones written;
    the engine orders ``fn`` after earlier writers (and, for ``mutable``,
    readers) of them, and holds later operations on them until ``done`` is
    called.  An exception raised by ``fn`` or passed to ``done`` is raised as
    ``MXNetError`` by the next read of the ``mutable`` arrays.  ``prop`` is
    "cpu_prioritized" (MXNet's priority CPU pool, as BytePS uses) or
    "normal".

    ``native_done=True`` is for an ``fn`` that may hand ``done`` to native code
    (:meth:`Completion.hand_over`): the operator then has no deleter, which the
    thread completing it would call with the GIL; ``fn`` and the arrays are
    forgotten once ``fn`` has run, and ``fn``'s work must keep alive what it uses
    (a :func:`numpy_view` keeps its array).
    """
    from mxnet.base import NDArrayHandle, c_str, check_call
    if not callable(fn):
        raise TypeError("fn must be callable")
    const, mutable = list(const), list(mutable)
    arrays = const + mutable
    for arr in arrays:
        if not hasattr(arr, "handle") or not hasattr(arr, "context"):
            raise TypeError("expected MXNet NDArrays, got %s" % type(arr).__name__)
    if prop not in PROPERTIES:
        raise ValueError("prop must be one of %s" % ", ".join(sorted(PROPERTIES)))
    dev = arrays[0].context if arrays else None
    ctx = _Context(dev.device_typeid if dev else 1, dev.device_id if dev else 0)
    c_const = (NDArrayHandle * max(len(const), 1))(*[a.handle for a in const])
    c_mutable = (NDArrayHandle * max(len(mutable), 1))(*[a.handle for a in mutable])
    c_prop = ctypes.c_int(PROPERTIES[prop])
    c_name = _names.get(name) or _names.setdefault(name, c_str(name))
    op_id = next(_ids)
    op = _Op(fn, arrays, c_name, native_done)
    with _pending_lock:
        _pending[op_id] = op
    try:
        check_call(_lib().MXEnginePushAsyncND(
            _run, ctypes.c_void_p(op_id), None if native_done else _delete, ctypes.byref(ctx),
            c_const, len(const), c_mutable, len(mutable),
            ctypes.byref(c_prop), ctypes.c_int(priority), c_name, ctypes.c_bool(False)))
    except BaseException:
        with _pending_lock:
            _pending.pop(op_id, None)
        raise
    if op.error is not None:    # only under NaiveEngine
        error, op.error = op.error, None
        if isinstance(error, BaseException):
            raise error
        raise RuntimeError(str(error))


def numpy_view(arr):
    """A writable numpy array over ``arr``'s CPU memory, without copying.

    Uses ``MXNDArrayGetData``, which neither waits nor synchronizes: call it
    only where the engine guarantees the data is ready - inside an operation
    pushed with ``arr`` as a dependency (``to_dlpack_for_read/write`` would
    wait on ``arr`` there and deadlock) or after ``wait_to_read()``.  The view
    keeps ``arr`` alive.  Dense CPU arrays only.
    """
    from mxnet.base import check_call
    if getattr(arr, "stype", "default") != "default":
        raise ValueError("numpy_view needs a dense NDArray, got stype %r" % arr.stype)
    if arr.context.device_type not in _CPU_DEVICE_TYPES:
        raise ValueError("numpy_view needs a CPU NDArray, got one on %s" % arr.context)
    dtype = np.dtype(arr.dtype)
    nbytes = int(np.prod(arr.shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return np.empty(arr.shape, dtype)
    ptr = ctypes.c_void_p()
    check_call(_lib().MXNDArrayGetData(arr.handle, ctypes.byref(ptr)))
    if not ptr.value:
        raise ValueError("NDArray has no data")
    buf = (ctypes.c_char * nbytes).from_address(ptr.value)
    buf._rdmakv_owner = arr     # the memory is the NDArray's: keep it alive
    return np.frombuffer(buf, dtype=dtype).reshape(arr.shape)
