"""What pushpull_async and broadcast_async return: a handle on an operation in
flight, on the Python data path (Handle) or in the native engine (NativeHandle),
and GroupHandle for several waited on as one."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Generic, Optional, TypeVar

from rdmakv.core.errors import PeerTimeout
from rdmakv.native import transport as _t

log = logging.getLogger("rdmakv.worker")

T = TypeVar("T")
"""A tensor: a numpy array, or any object with the buffer protocol or __dlpack__."""


class Handle(Generic[T]):
    """An operation in flight: wait() for its result, or poll done()."""

    def __init__(self, store, info, value, out, result_obj, priority, flags):
        self._store = store
        self.key = info.key
        self.info = info
        self.source = value           # held: sent from in place, must outlive the sends
        self.target = out
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
        self.settled = False          # the outcome is known; done-callbacks may still be running
        self._is_done = False         # callbacks ran too: waiters may look at the result
        self.expired = None           # the PeerTimeout of a wait() that gave up after RDMAKV_TIMEOUT
        self._error = None
        self._callbacks = []

    def done(self) -> bool:
        return self._is_done

    def wait_done(self, timeout):
        """Whether the operation is done within timeout seconds (it may have failed)."""
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
        if not self.wait_done(limit):
            error = self.timeout_error(limit)
            if timeout is None:
                self.expired = error  # close() then leaves at once, telling the others why
            raise error
        if self._error is not None:
            raise self._error
        return self._result

    def timeout_error(self, limit):
        """The PeerTimeout of a wait that gave up after limit seconds, naming who still owes what."""
        owing = self._store.owing(self)
        who = (f"still waiting for {'; '.join(owing)}" if owing
               else "its chunks wait behind an earlier round of the same key")
        return PeerTimeout(f"pushpull of key {self.info.name!r} (round {self.round}) did not complete "
                           f"within {limit:g} s: {who}; a worker or server is slow or gone")

    def exception(self) -> Optional[BaseException]:
        """What failed the operation, or None; meant for done-callbacks."""
        return self._error

    def add_done_callback(self, fn: Callable[[Handle[T]], object]) -> None:
        """Call fn(handle) once the outcome is known (at once if it is), from a transport
        thread, before wait() returns."""
        with self._lock:
            if not self.settled:
                self._callbacks.append(fn)
                return
        fn(self)

    def chunk_done(self):
        """One chunk's result is in place; the last one finishes the operation."""
        with self._lock:
            self._remaining -= 1
            finished = self._remaining == 0 and not self.settled
        if finished:
            self.finish(None)

    def finish(self, error):
        """Settle the operation (error None: it succeeded), once: run the done-callbacks,
        release the waiters, start the key's next round.  False if it was settled already."""
        with self._lock:
            if self.settled:
                return False
            self._error = error
            self.source = None
            self.settled = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("done-callback of key %r failed", self.key)
        self._is_done = True
        self._pending.release()
        self._store.advance(self)
        return True


class NativeHandle(Handle[T]):
    """A Handle whose operation runs in the native engine (EngineLink).  Made for
    every pushpull_async, so it sets only what it must: the key and round are
    read from the key and the operation, and the rest stays at the class's
    defaults until it changes."""

    expired = None
    _error = None

    def __init__(self, store, info, operation, result_obj, priority, flags):
        self._store = store
        self.info = info
        self._op = operation
        self._result = result_obj
        self.priority = priority
        self.flags = flags

    @property
    def key(self):
        return self.info.key

    @property
    def round(self):
        return self._op.round

    def done(self) -> bool:
        return self._op.done()

    def wait_done(self, timeout):
        return self._op.wait(max(0.0, timeout))

    def wait(self, timeout: Optional[float] = None) -> T:
        op = self._op
        # done() looks without releasing the GIL: an op waited for late is done already.
        if not op.done():
            limit = self._store.config.timeout if timeout is None else timeout
            if not op.wait(limit):
                # Failed already (its server's link, say) while a send on that link still holds
                # the buffers until it gives up: the failure is the answer, not a timeout.
                error = self.exception() if op.settled() else None
                if error is None:
                    error = self.timeout_error(limit)
                    if timeout is None:
                        self.expired = error
                raise error
        op.engine.reap()
        error = self.exception()
        if error is not None:
            raise error
        return self._result

    def exception(self) -> Optional[BaseException]:
        if self._error is None:
            outcome = self._op.outcome
            if outcome[0] != _t.OUTCOME_OK:
                self._error = self._store.outcome_error(outcome, self.info)
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

    def owed_by(self, link):
        """(indices of the chunks whose results link still owes, how many in all)."""
        return self._op.owed(link)


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
