"""Small tensors pushpulled together (KVStore.fuse): packed per dtype into one
fused key, summed as one, and unpacked."""
from __future__ import annotations

import hashlib
import threading
from typing import Any, Iterable, Optional

import numpy as np

from rdmakv.native import transport as _t
from rdmakv.worker.arrays import as_array
from rdmakv.worker.handles import GroupHandle
from rdmakv.worker.keys import Key, key_name

FUSE_BYTES = 64 * 1024        # fused groups pack tensors this small into one per dtype


class Fusion:
    """A store's fused keys: their names, and the staging arrays of each, reused from round to round."""

    def __init__(self, store):
        self.store = store
        self._lock = threading.Lock()
        self._buffers: dict = {}      # (group, dtype) -> staging arrays free for the next round
        self._layouts: dict = {}      # (dtype, ((key, shape), ...)) -> fused key name

    def layout(self, dtype, members):
        """The wire name of the fused key for these (key, source, target) members."""
        signature = (dtype, tuple((key, source.shape) for key, source, _ in members))
        group = self._layouts.get(signature)
        if group is None:
            names = "|".join(f"{key_name(key)}{list(shape)}" for key, shape in signature[1])
            group = self._layouts[signature] = "fused:" + hashlib.blake2b(names.encode(),
                                                                          digest_size=12).hexdigest()
        return group

    def pushpull_async(self, group, dtype, sources, targets, size, priority):
        """Pack sources into a staging array, pushpull it as key group, unpack into targets."""
        with self._lock:
            pool = self._buffers.setdefault((group, dtype), [])
            staging = pool.pop() if pool else np.empty(size, dtype)
        _t.pack(sources, staging)
        handle = self.store.pushpull_async(group, staging, priority=priority)

        def unpack(done):
            if done.exception() is None:
                _t.unpack(staging, targets)
            with self._lock:
                pool.append(staging)

        handle.add_done_callback(unpack)
        return handle


class FusedGroup:
    """Keys pushpulled together (KVStore.fuse).  The group keeps the arrays it
    was given: each call sums their current contents into the outputs, with
    one copy in and one copy out for all the small tensors of a dtype."""

    def __init__(self, fusion: Fusion, keys: Iterable[Key], values: Iterable[Any],
                 outs: Optional[Iterable[Any]] = None) -> None:
        keys, values = list(keys), list(values)
        outs = [None] * len(keys) if outs is None else list(outs)
        if not len(keys) == len(values) == len(outs):
            raise ValueError(f"{len(keys)} keys, {len(values)} values and {len(outs)} outs do not match")
        if len(set(keys)) != len(keys):
            raise ValueError("a fused group got the same key twice")
        self._fusion = fusion
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
        self._fused = [(fusion.layout(dtype, members), dtype, [source for _, source, _ in members],
                        [target for _, _, target in members], sum(source.size for _, source, _ in members))
                       for dtype, members in small.items()]
        self.results = [value if out is None else out for value, out in zip(values, outs)]

    def pushpull_async(self, priority: int = 0) -> GroupHandle:
        """Start this step's sums; a GroupHandle whose wait() gives the results."""
        fusion = self._fusion
        parts = [fusion.store.pushpull_async(key, value, out, priority) for key, value, out in self._large]
        parts += [fusion.pushpull_async(group, dtype, sources, targets, size, priority)
                  for group, dtype, sources, targets, size in self._fused]
        return GroupHandle(parts, self.results)

    def pushpull(self, priority: int = 0) -> list[Any]:
        """This step's sums, in the order of the keys."""
        return self.pushpull_async(priority).wait()
