"""A real local cluster for tests: the scheduler and servers are separate
processes (python -m rdmakv.server); workers are KVStores in this process,
one thread each, talking to them over loopback sockets."""
import os
import socket
import subprocess
import sys
import threading
from collections import deque

import rdmakv
from rdmakv.core.netif import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The waits written into tests are this machine's.  Under emulation, where a Python process
# takes seconds to start (the soft-RoCE VM's TCG), ci/rxe.sh --suite stretches them by this.
TIME_SCALE = float(os.environ.get("RDKV_TEST_TIME_SCALE", "1"))


def scaled(seconds):
    """A test's wait of `seconds` here, on the machine the tests run on."""
    return seconds * TIME_SCALE


def tagged(marker):
    """pids of live processes whose environment carries marker."""
    found = []
    needle = f"RDKV_TEST_MARKER={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if needle in environ.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat") as stat:
                        if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(entry))
        except OSError:
            pass
    return found


def run_threads(fns, timeout=60):
    """Run each fn in its own thread, each given scaled(timeout); return (results, errors)."""
    timeout = scaled(timeout)
    results = [None] * len(fns)
    errors = [None] * len(fns)

    def call(i):
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(fns))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"a worker thread did not finish within {timeout} s")
    return results, errors


class LocalCluster:
    def __init__(self, num_workers, num_servers, host="127.0.0.1", **env):
        self.num_workers = num_workers
        self.num_servers = num_servers
        self.host = host
        self.port = free_port(host)
        self.env = dict(os.environ, DMLC_PS_ROOT_URI=host, DMLC_PS_ROOT_PORT=str(self.port),
                        DMLC_NUM_WORKER=str(num_workers), DMLC_NUM_SERVER=str(num_servers),
                        RDMAKV_TIMEOUT=os.environ.get("RDMAKV_TIMEOUT", "30"), PYTHONPATH=REPO)
        self.env.update({k: str(v) for k, v in env.items()})
        self.procs = []
        self.logs = []                # the last lines each process logged
        self.stores = []

    def start(self):
        for role in ["scheduler"] + ["server"] * self.num_servers:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rdmakv.server"], env=dict(self.env, DMLC_ROLE=role),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.procs.append(proc)
            # Drain the log as it comes: a full pipe would block a chatty server in logging.
            self.logs.append(deque(maxlen=200))
            threading.Thread(target=self._drain, args=(proc, self.logs[-1]), daemon=True).start()
        return self

    def raw_connection(self, timeout=10):
        """A plain socket to the scheduler, once it listens."""
        import time
        deadline = time.monotonic() + timeout
        while True:
            try:
                return socket.create_connection((self.host, self.port), timeout=timeout)
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @staticmethod
    def _drain(proc, tail):
        for line in iter(proc.stderr.readline, b""):
            tail.append(line.decode(errors="replace").rstrip())

    def settings(self, **overrides):
        base = {"scheduler_host": self.host, "scheduler_port": self.port, "num_workers": self.num_workers,
                "num_servers": self.num_servers, "timeout": float(self.env["RDMAKV_TIMEOUT"])}
        for name, variable, parse in (("partition_bytes", "RDMAKV_PARTITION_BYTES", int),
                                      ("scheduling_credit", "RDMAKV_SCHEDULING_CREDIT", int),
                                      ("trace_dir", "RDMAKV_TRACE_DIR", str),
                                      ("transport", "RDMAKV_TRANSPORT", str),
                                      ("secret", "RDMAKV_SECRET", str),
                                      ("secret_file", "RDMAKV_SECRET_FILE", str),
                                      ("integrity", "RDMAKV_INTEGRITY", str)):
            if variable in self.env:
                base[name] = parse(self.env[variable])
        base.update(overrides)
        return base

    def connect(self):
        """One KVStore per worker, created concurrently (each waits for the full rendezvous)."""
        stores, errors = run_threads(
            [lambda i=i: rdmakv.KVStore(worker_id=i, **self.settings()) for i in range(self.num_workers)])
        self.stores.extend(s for s in stores if s is not None)
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]
        return stores

    def run(self, fn, timeout=60):
        """fn(kv) on every worker at once; returns the results in rank order."""
        stores = self.stores or self.connect()
        results, errors = run_threads([lambda kv=kv: fn(kv) for kv in stores], timeout)
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]
        return results

    def run_collect(self, fn, timeout=60):
        """Like run, but returns (results, errors) so tests can inspect each worker's failure."""
        stores = self.stores or self.connect()
        return run_threads([lambda kv=kv: fn(kv) for kv in stores], timeout)

    def wait(self, timeout=30):
        """Exit codes of the scheduler and servers once they stop."""
        return [proc.wait(timeout) for proc in self.procs]

    def close(self):
        for kv in self.stores:
            kv.close(timeout=5)
        self.stores = []
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
