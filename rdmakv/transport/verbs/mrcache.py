"""A memory-registration cache (policy; pure Python).

Registering memory is expensive (the kernel pins and maps every page), so a
buffer that is pushed or pulled repeatedly should be registered once.  The
cache keys registrations by (address, length, access), not by address alone:
ps-lite's address-only map hands back a too-short MR when a buffer at a
reused address grows.

Each cached MR holds its buffer's export (rdmakv's MR does), so a cached
address can never be freed and handed to a different buffer while the entry
exists: a hit always names the same live memory.  The price is that cached
buffers stay alive until evicted; `budget_bytes` bounds that.  Eviction is
least-recently-used, deregistering as it goes, and skips entries that are
leased (in use by an outstanding work request).  The budget is soft: a
single registration larger than it, or leases, can exceed it until released.
"""
import threading
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np

__all__ = ["MRCache", "buffer_span"]


def buffer_span(buffer):
    """(address, nbytes) of a contiguous buffer-protocol object."""
    view = memoryview(buffer)
    if not view.contiguous:
        raise ValueError("only contiguous buffers can be registered")
    if view.nbytes == 0:
        return 0, 0
    arr = np.frombuffer(view.cast("B"), dtype=np.uint8)
    return arr.ctypes.data, arr.nbytes


class _Entry:
    __slots__ = ("mr", "nbytes", "leases")

    def __init__(self, mr, nbytes):
        self.mr = mr
        self.nbytes = nbytes
        self.leases = 0


class MRCache:
    """MRCache(register, budget_bytes=1 GiB).

    `register(buffer, access)` returns a registration with `close()`; pass a
    PD instead to use `MR(pd, buffer, access)`.  `get()` returns a cached or
    new registration; `lease()` also pins it against eviction for the
    duration of a `with` block (use it around post ... completion)."""

    def __init__(self, register, budget_bytes=1 << 30):
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        if not callable(register):
            from rdmakv.native import transport
            pd = register
            register = lambda buf, access: transport.MR(pd, buf, access)  # noqa: E731
        self._register = register
        self.budget_bytes = int(budget_bytes)
        self._entries = OrderedDict()      # key -> _Entry, least recently used first
        self._lock = threading.RLock()
        self._closed = False
        self.registered_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def keys(self):
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def stats(self):
        return {"entries": len(self._entries), "registered_bytes": self.registered_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}

    def get(self, buffer, access):
        """The registration for (buffer's address, length, access)."""
        return self._acquire(buffer, access, lease=False)

    @contextmanager
    def lease(self, buffer, access):
        """Like get(), and pinned against eviction until the block exits."""
        pin = self.pin(buffer, access)
        try:
            yield pin[1]
        finally:
            self.unpin(pin)

    def pin(self, buffer, access):
        """A lease that outlives a block (e.g. memory offered to a peer until it
        writes there): returns a (key, mr) token; give it back with unpin()."""
        return self._acquire(buffer, access, lease=True, with_key=True)

    def unpin(self, pin):
        key, mr = pin
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.mr is mr:
                entry.leases -= 1
            if not self._closed:
                self._shrink(keep=None)

    def _acquire(self, buffer, access, lease, with_key=False):
        addr, nbytes = buffer_span(buffer)
        if nbytes == 0:
            raise ValueError("cannot register an empty buffer")
        key = (addr, nbytes, int(access))
        with self._lock:
            if self._closed:
                raise ValueError("MRCache is closed")
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
                mr = self._register(buffer, access)
                entry = _Entry(mr, nbytes)
                self._entries[key] = entry
                self.registered_bytes += nbytes
                self._shrink(keep=key)
            if lease:
                entry.leases += 1
            return (key, entry.mr) if with_key else entry.mr

    def _shrink(self, keep):
        """Evict least-recently-used, unleased entries until within budget."""
        if self.registered_bytes <= self.budget_bytes:
            return
        for key in list(self._entries):
            if self.registered_bytes <= self.budget_bytes:
                break
            entry = self._entries[key]
            if key == keep or entry.leases:
                continue
            self._drop(key)
            self.evictions += 1

    def _drop(self, key):
        entry = self._entries.pop(key)
        self.registered_bytes -= entry.nbytes
        entry.mr.close()

    def invalidate(self, buffer):
        """Deregister every cached registration overlapping buffer's memory
        (call before freeing or resizing it from C).  Returns how many.
        Leased entries are dropped too: their work requests will then fail
        with a protection error rather than touch freed memory."""
        addr, nbytes = buffer_span(buffer)
        with self._lock:
            doomed = [k for k in self._entries if k[0] < addr + nbytes and addr < k[0] + k[1]]
            for key in doomed:
                self._drop(key)
            return len(doomed)

    def close(self):
        """Deregister everything.  Idempotent."""
        with self._lock:
            self._closed = True
            for key in list(self._entries):
                self._drop(key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
