"""One push per host (rdmakv/control/hierarchy.py), the memory: per key, a
file the workers of one host map, holding two host sums per chunk (even and
odd rounds), each after the 64-byte control block of _shm.h (its lock, round,
contributions, and the round whose result it holds).  worker_engine.c runs
the steps; this module only makes the memory and words what goes wrong.

The file is /dev/shm/rdmakv-host-<token>-<wire key>: the token is the
scheduler's, random per host and job, sent only over the authenticated
control connection, so no other job or process can guess the name.  Whoever
comes first creates it (mode 0600, no links followed), every worker checks
its owner and size, and counts itself in the file's first word under an
exclusive flock: the last of the host's workers to map it removes the name,
so nothing is left in /dev/shm once every worker has declared the key (a
worker that closes removes the names it made too)."""
import errno
import fcntl
import mmap
import os
import struct

from rdmakv.core.errors import RdmaKVError

DIRECTORY = "/dev/shm"
FILE_HEADER = 64          # the file's own block: how many of the host's workers mapped it
SUM_CONTROL = 64          # _shm.h RDMAKV_SUM_CONTROL, before each sum
ALIGN = 64


def layout(sizes):
    """([offset of chunk i's even sum, its odd sum, ...], the file's bytes) for chunks of these sizes."""
    offsets, end = [], FILE_HEADER
    for nbytes in sizes:
        for _ in range(2):
            end += SUM_CONTROL
            offsets.append(end)
            end += -(-nbytes // ALIGN) * ALIGN
    return offsets, end


class HostSums:
    """This worker's part in one push per host (the plan's entry for it) and the
    memory of its keys' host sums."""

    def __init__(self, rank, part, timeout):
        self.rank = rank
        self.root = part["root"]
        self.workers = list(part["workers"])
        self.host = part["host"]
        self.remote_servers = set(part["remote_servers"])
        self.timeout = timeout
        self._token = part["token"]
        if not isinstance(self._token, str) or not self._token.isalnum():
            raise RdmaKVError(f"the scheduler's host token {self._token!r} is not alphanumeric")
        self._named = []          # paths this worker may still have to remove

    @property
    def is_root(self):
        return self.rank == self.root

    def path(self, wire):
        return os.path.join(DIRECTORY, f"rdmakv-host-{self._token}-{wire:016x}")

    def map_key(self, wire, sizes):
        """(memory, offsets) of the key's host sums: the host's shared file, mapped."""
        offsets, size = layout(sizes)
        path = self.path(wire)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RdmaKVError(f"one push per host: cannot open {path}: {exc.strerror} "
                              f"(RDMAKV_HIERARCHY=0 turns it off)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            status = os.fstat(fd)
            if status.st_uid != os.getuid() or status.st_mode & 0o077:
                raise RdmaKVError(f"one push per host: {path} belongs to uid {status.st_uid} with mode "
                                  f"{status.st_mode & 0o777:o}, not to this user alone")
            if status.st_size == 0:
                os.ftruncate(fd, size)
                self._named.append(path)
            elif status.st_size != size:
                raise RdmaKVError(f"one push per host: {path} holds {status.st_size} bytes, key "
                                  f"{wire:#x} needs {size}: the host's workers declared it differently")
            memory = mmap.mmap(fd, size)
            mapped = struct.unpack_from("<I", memory, 0)[0] + 1
            struct.pack_into("<I", memory, 0, mapped)
            if mapped >= len(self.workers):
                self._remove(path)
            return memory, offsets
        finally:
            # Explicitly: the mapping holds a duplicate of the descriptor, and with it the lock.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _remove(self, path):
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        if path in self._named:
            self._named.remove(path)

    def close(self):
        """Remove the names this worker made that are still there (the mappings
        go with the engine that holds them)."""
        for path in list(self._named):
            try:
                self._remove(path)
            except OSError:
                pass

    def describe_stall(self):
        """What a host sum that waited past the timeout means, from this worker's side."""
        if self.is_root:
            others = [r for r in self.workers if r != self.rank]
            return (f"the other workers of host {self.host} (workers {others}) did not all add their push "
                    f"into the host's sum within {self.timeout:g} s (RDMAKV_TIMEOUT): one stalled or died")
        return (f"the local root of host {self.host} (worker {self.root}) did not hand back the result "
                f"within {self.timeout:g} s (RDMAKV_TIMEOUT): it stalled or died")
