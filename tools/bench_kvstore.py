#!/usr/bin/env python3
"""Time pushpull on a local cluster, side by side with what a user would pick instead.

    .venv/bin/python tools/bench_kvstore.py [--quick] [--json FILE] [--plot FILE.png]

For each workload (float32 tensors of 4 KiB, 256 KiB, 4 MiB, 64 MiB, and
ResNet-50's 161 gradient tensors) and each system it starts a fresh cluster of
real processes on 127.0.0.1:

  rdmakv   scheduler + servers (python -m rdmakv.server) + workers (KVStore.pushpull)
  mxnet    MXNet 1.9.1 dist_sync on its own ps-lite: scheduler + servers
           (python -c "import mxnet") + workers (kv.pushpull(key, nd, out=nd))
  gloo     torch.distributed all_reduce over gloo, one process per worker

and it measures the loopback limits: iperf3 with one stream, iperf3 with as
many parallel streams (-P) as rdmakv opens TCP connections for its data (one
from every worker to every server; counted from /proc in each run and shown
beside it), and a numpy memcpy.  Every step's result is checked to be the exact sum (small-integer
float32 values, different every step), outside the timed window; a step is
timed from the call to the moment its result is ready on that worker.

A worker process talks to this one through its stdin/stdout: it prints
`BENCH {json}` lines (ready, done) and waits for `go` / `exit`, so the CPU time
of the servers can be read from /proc exactly around the timed steps.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:          # runnable as a plain script from a checkout
    sys.path.insert(0, REPO)

from rdmakv.core.netif import free_port  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SYSTEMS = ("rdmakv", "rdmakv-python", "mxnet", "gloo")
DEFAULT_SYSTEMS = ("rdmakv", "mxnet", "gloo")
# rdmakv-python: rdmakv on its Python data path (RDMAKV_ENGINE=python), the baseline of the native engine
RDMAKV_SYSTEMS = {"rdmakv": {}, "rdmakv-python": {"RDMAKV_ENGINE": "python"}}
WORKLOADS = ("4KiB", "256KiB", "4MiB", "64MiB", "resnet50")
# Not run by default: per-key overhead, many small keys against one key of the same total size.
EXTRA_WORKLOADS = ("1MiB", "1024x1KiB")
SIZES = {"4KiB": 4 * KiB, "256KiB": 256 * KiB, "1MiB": MiB, "4MiB": 4 * MiB, "64MiB": 64 * MiB}
# (timed steps, warm-up steps): full run / --quick
STEPS = {"4KiB": (2000, 50), "256KiB": (500, 20), "1MiB": (50, 5), "4MiB": (100, 5), "64MiB": (20, 2),
         "resnet50": (20, 2), "1024x1KiB": (30, 3)}
QUICK_STEPS = {"4KiB": (10, 2), "256KiB": (6, 1), "1MiB": (4, 1), "4MiB": (4, 1), "64MiB": (2, 1),
               "resnet50": (2, 1), "1024x1KiB": (2, 1)}
RESNET50_TENSORS = 161
RESNET50_VALUES = 25_557_032


# ---- workloads -------------------------------------------------------------
def resnet50_shapes():
    """The parameter shapes of ResNet-50 (He et al. 2016, bottleneck v1.5 as in
    torchvision) in forward (declaration) order: convolutions without bias,
    batch norms with weight and bias, the 1000-way classifier."""
    shapes = []

    def conv(out_ch, in_ch, k):
        shapes.append((out_ch, in_ch, k, k))

    def bn(ch):
        shapes.extend([(ch,), (ch,)])

    conv(64, 3, 7)
    bn(64)
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            conv(width, in_ch, 1)
            bn(width)
            conv(width, width, 3)
            bn(width)
            conv(width * 4, width, 1)
            bn(width * 4)
            if block == 0:
                conv(width * 4, in_ch, 1)    # downsample projection
                bn(width * 4)
            in_ch = width * 4
    shapes.append((1000, 2048))
    shapes.append((1000,))
    return shapes


def workload_shapes(name):
    if name == "resnet50":
        shapes = resnet50_shapes()
        total = sum(_count(s) for s in shapes)
        assert len(shapes) == RESNET50_TENSORS and total == RESNET50_VALUES, (len(shapes), total)
        return shapes
    if name == "1024x1KiB":
        return [(256,)] * 1024
    return [(SIZES[name] // 4,)]


def _count(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def workload_bytes(name):
    return 4 * sum(_count(s) for s in workload_shapes(name))


class Tensors:
    """Per-tensor value, expected-sum and output buffers, refilled in place every
    step so the timed loop allocates nothing.  Worker r's value in step i is
    base + (i + r) % 3 with base in -8..8, so every sum is an exact float32."""

    def __init__(self, shapes, rank, num_workers):
        import numpy as np
        self.np = np
        self.rank = rank
        self.num_workers = num_workers
        self.base = [((np.arange(_count(s), dtype=np.int64) * 7 + k) % 17 - 8).astype(np.float32).reshape(s)
                     for k, s in enumerate(shapes)]
        self.values = [np.empty_like(b) for b in self.base]
        self.expected = [np.empty_like(b) for b in self.base]
        self.harness_bytes = 2 * sum(b.nbytes for b in self.base)   # base + expected: not what a trainer holds

    def fill(self, step):
        np = self.np
        offset = (step + self.rank) % 3
        total = sum((step + r) % 3 for r in range(self.num_workers))
        for base, value, expected in zip(self.base, self.values, self.expected):
            np.add(base, np.float32(offset), out=value)
            np.multiply(base, np.float32(self.num_workers), out=expected)
            np.add(expected, np.float32(total), out=expected)

    def check(self, outputs):
        """True when every output equals its expected sum exactly (compared in blocks: no big temporaries)."""
        np = self.np
        block = 1 << 20
        for out, expected in zip(outputs, self.expected):
            a, b = out.reshape(-1), expected.reshape(-1)
            for start in range(0, a.size, block):
                if not np.array_equal(a[start:start + block], b[start:start + block]):
                    return False
        return True


# ---- worker side: one class per system --------------------------------------
class RdmakvWorker:
    def __init__(self, shapes, rank, num_workers):
        import numpy as np
        import rdmakv
        self.kv = rdmakv.KVStore()
        self.t = Tensors(shapes, self.kv.rank, num_workers)
        self.outputs = [np.empty_like(b) for b in self.t.base]
        self.keys = list(range(len(shapes)))
        # --rdmakv-env RDMAKV_BENCH_FUSE=1: one pushpull_many call per step, which fuses the small
        # tensors; RDMAKV_BENCH_FUSE=group: a group made once with kv.fuse(), pushpulled every step
        fuse = os.environ.get("RDMAKV_BENCH_FUSE", "")
        self.fuse = fuse == "1"
        self.group = None
        if fuse == "group":
            order = list(reversed(self.keys))
            self.group = self.kv.fuse(order, [self.t.values[i] for i in order], [self.outputs[i] for i in order])

    def prepare(self, step):
        self.t.fill(step)
        for out in self.outputs:
            out.fill(float("nan"))

    def step(self):
        kv, values, outputs = self.kv, self.t.values, self.outputs
        if len(values) == 1:
            kv.pushpull(0, values[0], out=outputs[0])
            return
        if self.group is not None:
            self.group.pushpull()
            return
        if self.fuse:
            order = list(reversed(self.keys))
            kv.pushpull_many(order, [values[i] for i in order], [outputs[i] for i in order])
            return
        handles = [kv.pushpull_async(i, values[i], out=outputs[i], priority=-i)
                   for i in reversed(self.keys)]      # backward order: the last layer's gradient is ready first
        for handle in handles:
            handle.wait()

    def check(self):
        return self.t.check(self.outputs)

    def barrier(self):
        self.kv.barrier()

    def close(self):
        self.kv.close()


class MxnetWorker:
    def __init__(self, shapes, rank, num_workers):
        import mxnet as mx
        self.mx = mx
        self.kv = mx.kv.create("dist_sync")
        self.t = Tensors(shapes, self.kv.rank, num_workers)
        self.nds = [mx.nd.array(b, dtype="float32") for b in self.t.base]
        for i, nd in enumerate(self.nds):
            self.kv.init(i, nd)
        mx.nd.waitall()

    def prepare(self, step):
        self.t.fill(step)
        for nd, value in zip(self.nds, self.t.values):
            nd[:] = value
        self.mx.nd.waitall()

    def step(self):
        kv, nds = self.kv, self.nds
        if len(nds) == 1:
            kv.pushpull(0, nds[0], out=nds[0])
            nds[0].wait_to_read()
            return
        for i in reversed(range(len(nds))):
            kv.pushpull(i, nds[i], out=nds[i], priority=-i)
        self.mx.nd.waitall()

    def check(self):
        return self.t.check([nd.asnumpy() for nd in self.nds])

    def barrier(self):
        self.kv._barrier()

    def close(self):
        self.mx.nd.waitall()
        del self.kv


class GlooWorker:
    def __init__(self, shapes, rank, num_workers):
        import torch
        import torch.distributed as dist
        self.dist = dist
        dist.init_process_group("gloo", init_method=os.environ["BENCH_INIT_METHOD"],
                                rank=rank, world_size=num_workers)
        self.t = Tensors(shapes, rank, num_workers)
        self.tensors = [torch.from_numpy(v) for v in self.t.values]   # shares memory: reduced in place

    def prepare(self, step):
        self.t.fill(step)

    def step(self):
        if len(self.tensors) == 1:
            self.dist.all_reduce(self.tensors[0])
            return
        works = [self.dist.all_reduce(self.tensors[i], async_op=True) for i in reversed(range(len(self.tensors)))]
        for work in works:
            work.wait()

    def check(self):
        return self.t.check(self.t.values)

    def barrier(self):
        self.dist.barrier()

    def close(self):
        self.dist.destroy_process_group()


WORKER_CLASSES = {"rdmakv": RdmakvWorker, "rdmakv-python": RdmakvWorker, "mxnet": MxnetWorker, "gloo": GlooWorker}


def _say(event, **fields):
    sys.stdout.write("BENCH " + json.dumps(dict(fields, event=event)) + "\n")
    sys.stdout.flush()


def _await(word):
    line = sys.stdin.readline().strip()
    if line != word:
        raise SystemExit(f"bench worker: expected {word!r} from the driver, got {line!r}")


def worker_main(system, workload, rank, num_workers, steps, warmup):
    """Runs in each worker process."""
    shapes = workload_shapes(workload)
    worker = WORKER_CLASSES[system](shapes, rank, num_workers)
    exact = True
    for i in range(warmup):
        worker.prepare(i)
        worker.step()
        exact &= worker.check()
    _say("ready", rank=rank)
    _await("go")
    worker.barrier()
    times, cpu = [], 0.0
    for i in range(warmup, warmup + steps):
        worker.prepare(i)
        worker.barrier()      # every worker starts the step together: refilling many tensors takes a while
        c0, t0 = time.process_time(), time.perf_counter()
        worker.step()
        t1, c1 = time.perf_counter(), time.process_time()
        times.append(t1 - t0)
        cpu += c1 - c0
        exact &= worker.check()
    worker.barrier()
    _say("done", rank=rank, times=times, cpu=cpu, exact=bool(exact), harness_bytes=worker.t.harness_bytes,
         maxrss=proc_peak_rss(os.getpid()))   # VmHWM: ru_maxrss would include the pre-exec image of the driver
    _await("exit")
    worker.close()


# ---- driver side -------------------------------------------------------------
def proc_cpu(pid):
    """user + system CPU seconds of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


class ClusterRun:
    """One system on one workload: start the processes, drive the phases, collect."""

    def __init__(self, args, system, workload, python):
        self.args = args
        self.system = system
        self.workload = workload
        self.python = python
        self.logdir = tempfile.mkdtemp(prefix=f"bench-{system}-{workload}-")
        self.helpers = []         # (role, Popen): scheduler and servers
        self.workers = []
        self.lines = {}
        self.data_connections = None

    def _env(self):
        port = free_port()
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(port),
                   DMLC_NUM_WORKER=str(self.args.workers), DMLC_NUM_SERVER=str(self.args.servers),
                   DMLC_NODE_HOST="127.0.0.1", RDMAKV_TIMEOUT="120", PYTHONUNBUFFERED="1")
        if self.system in RDMAKV_SYSTEMS:
            env.update(self.args.rdmakv_env, **RDMAKV_SYSTEMS[self.system])
        if self.system == "mxnet":
            env.update(DMLC_INTERFACE="lo", PS_VERBOSE="0")
        if self.system == "gloo":
            env.update(BENCH_INIT_METHOD=f"tcp://127.0.0.1:{port}", GLOO_SOCKET_IFNAME="lo")
        return env

    def _spawn(self, role, argv, env, stdin=False):
        log = open(os.path.join(self.logdir, f"{role}.log"), "wb")
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE if stdin else log, stderr=log, start_new_session=True)
        proc.log_path = log.name
        log.close()
        return proc

    def start(self):
        env = self._env()
        helper = {"mxnet": [self.python, "-c", "import mxnet"],
                  **{name: [self.python, "-m", "rdmakv.server"] for name in RDMAKV_SYSTEMS}}.get(self.system)
        if helper:
            self.helpers.append(("scheduler", self._spawn("scheduler", helper, dict(env, DMLC_ROLE="scheduler"))))
            for s in range(self.args.servers):
                self.helpers.append(("server", self._spawn(f"server{s}", helper, dict(env, DMLC_ROLE="server"))))
        steps, warmup = (QUICK_STEPS if self.args.quick else STEPS)[self.workload]
        if self.args.steps:
            steps = self.args.steps
        for rank in range(self.args.workers):
            argv = [self.python, os.path.abspath(__file__), "--worker", self.system, "--workload", self.workload,
                    "--rank", str(rank), "--workers", str(self.args.workers),
                    "--steps", str(steps), "--warmup", str(warmup)]
            self.workers.append(self._spawn(f"worker{rank}", argv,
                                            dict(env, DMLC_ROLE="worker", DMLC_WORKER_ID=str(rank)), stdin=True))
        self.steps = steps
        return self

    def _read_event(self, proc, deadline):
        """The next BENCH event of a worker; other output goes to its log."""
        result = {}

        def read():
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace")
                if line.startswith("BENCH "):
                    result["event"] = json.loads(line[6:])
                    return
                with open(proc.log_path, "a") as log:
                    log.write(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if "event" not in result:
            raise RuntimeError(self._failure("no answer from a worker in time" if reader.is_alive()
                                             else "a worker exited early"))
        return result["event"]

    def _failure(self, what):
        tails = []
        for role, proc in [(f"worker{i}", w) for i, w in enumerate(self.workers)] + self.helpers:
            state = proc.poll()
            try:
                with open(proc.log_path, errors="replace") as f:
                    tail = f.read()[-600:].strip()
            except OSError:
                tail = ""
            if state not in (None, 0) or tail:
                tails.append(f"{role} (exit {state}): {tail.splitlines()[-1] if tail else ''}")
        return f"{what}; " + " | ".join(tails) + f" (logs in {self.logdir})"

    def _tell(self, word):
        for proc in self.workers:
            proc.stdin.write(word.encode() + b"\n")
            proc.stdin.flush()

    def run(self):
        deadline = time.monotonic() + self.args.timeout
        try:
            for proc in self.workers:
                event = self._read_event(proc, deadline)
                assert event["event"] == "ready", event
            servers = [p.pid for role, p in self.helpers if role == "server"]
            if servers:
                self.data_connections = count_tcp_connections([p.pid for p in self.workers], servers)
            helper_cpu0 = {id(p): proc_cpu(p.pid) for _, p in self.helpers if p.poll() is None}
            self._tell("go")
            done = [self._read_event(proc, deadline) for proc in self.workers]
            helper_cpu = {}
            helper_rss = {}
            for role, p in self.helpers:
                if p.poll() is None:
                    helper_cpu.setdefault(role, 0.0)
                    helper_cpu[role] += proc_cpu(p.pid) - helper_cpu0.get(id(p), 0.0)
                    helper_rss[role] = max(helper_rss.get(role, 0), proc_peak_rss(p.pid) or 0)
            self._tell("exit")
            self._finish(deadline)
        finally:
            self.stop()
        steps = len(done[0]["times"])
        per_step = [max(d["times"][i] for d in done) for i in range(steps)]   # the slowest worker sets the pace
        cpu_roles = {"worker": sum(d["cpu"] for d in done) / len(done) / steps}
        cpu_roles.update({role: cpu / steps for role, cpu in helper_cpu.items()})
        cpu_total = sum(d["cpu"] for d in done) / steps + sum(helper_cpu.values()) / steps
        rss = {"worker": max(d["maxrss"] for d in done)}
        harness = max(d["harness_bytes"] for d in done)
        rss.update(helper_rss)
        nbytes = workload_bytes(self.workload)
        median = statistics.median(per_step)
        return {"status": "ok", "exact": all(d["exact"] for d in done), "steps": steps,
                "step_ms_median": median * 1e3, "step_ms_p90": _percentile(per_step, 90) * 1e3,
                "step_ms_min": min(per_step) * 1e3,
                "bytes_per_worker_per_s": nbytes / median,
                "cpu_s_per_step": cpu_total, "cpu_s_per_step_by_role": cpu_roles,
                "peak_rss_bytes_by_role": rss, "worker_harness_bytes": harness,
                "worker_server_tcp_connections": self.data_connections}

    def _finish(self, deadline):
        for proc in self.workers + [p for _, p in self.helpers]:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def stop(self):
        for proc in self.workers + [p for _, p in self.helpers]:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            if proc.stdin:
                proc.stdin.close()
            if proc.stdout:
                proc.stdout.close()


def _socket_inodes(pid):
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:       # closed since the listing
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _established_tcp():
    """{socket inode: (local address, remote address)} of this network namespace's established TCP sockets."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "01":         # TCP_ESTABLISHED
                sockets[int(fields[9])] = (fields[1], fields[2])
    return sockets


def count_tcp_connections(worker_pids, server_pids):
    """How many established TCP connections join a worker process to a server process:
    a worker's socket whose remote end is the local end of a server's socket."""
    sockets = _established_tcp()
    server_ends = {sockets[i] for pid in server_pids for i in _socket_inodes(pid) if i in sockets}
    return sum(1 for pid in worker_pids for i in _socket_inodes(pid)
               if i in sockets and sockets[i][::-1] in server_ends)


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def available(system, python):
    """None when the system can run, else why not."""
    probe = {"rdmakv": "import rdmakv.native", "rdmakv-python": "import rdmakv.native",
             "mxnet": "import mxnet; assert mxnet.__version__",
             "gloo": "import torch.distributed as d; assert d.is_gloo_available(), 'gloo not built'"}[system]
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return f"interpreter {python} not found"
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=180,
                              env=dict(os.environ, PYTHONPATH=REPO))
    except subprocess.TimeoutExpired:
        return "importing it took over 180 s"
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"{probe.split(';')[0]} failed with {python}: {last}"
    return None


def measure_iperf3(seconds, streams=1):
    """Loopback TCP throughput, summed over `streams` parallel connections (iperf3 -P)."""
    exe = shutil.which("iperf3")
    if exe is None:
        return {"status": "skipped", "reason": "iperf3 is not installed (apt-get install iperf3)"}
    last = "no attempt"
    for _ in range(20):
        port = free_port()
        server = subprocess.Popen([exe, "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)       # let it listen: a probe connection would use up its one session
            proc = subprocess.run([exe, "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J",
                                   "-P", str(streams)],
                                  capture_output=True, text=True, timeout=seconds + 30)
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()
        try:
            report = json.loads(proc.stdout)
            bps = report["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError):
            last = (proc.stdout + proc.stderr)[-300:]
            continue
        return {"status": "ok", "bytes_per_s": bps / 8, "gbit_per_s": bps / 1e9, "seconds": seconds,
                "streams": streams, "cpu_utilization_percent": report["end"].get("cpu_utilization_percent")}
    return {"status": "failed", "reason": last}


def measure_memcpy(nbytes=64 * MiB, repeats=10):
    import numpy as np
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return {"status": "ok", "bytes": nbytes, "bytes_per_s": nbytes / statistics.median(times)}


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def run_all(args):
    python = sys.executable
    pythons = {"rdmakv": python, "rdmakv-python": python, "mxnet": args.mxnet_python or python,
               "gloo": args.torch_python or python}
    report = {"config": {"workers": args.workers, "servers": args.servers, "quick": args.quick,
                         "host": "127.0.0.1", "cpus": os.cpu_count(), "python": python,
                         "rdmakv_env": args.rdmakv_env, "iperf_streams": args.iperf_streams,
                         "loadavg_start": loadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")},
              "skipped": {}, "limits": {}, "workloads": {}}
    progress(f"loopback: iperf3 ({args.iperf_seconds} s, 1 and {args.iperf_streams} streams) and memcpy")
    report["limits"]["iperf3"] = measure_iperf3(args.iperf_seconds)
    report["limits"]["iperf3_parallel"] = (measure_iperf3(args.iperf_seconds, args.iperf_streams)
                                           if args.iperf_streams > 1 else report["limits"]["iperf3"])
    report["limits"]["memcpy"] = measure_memcpy()
    systems = [s for s in SYSTEMS if s in args.systems]
    for system in systems:
        reason = available(system, pythons[system])
        if reason:
            report["skipped"][system] = reason
            progress(f"{system}: skipped: {reason}")
    for workload in args.workloads:
        nbytes = workload_bytes(workload)
        entry = {"bytes": nbytes, "tensors": len(workload_shapes(workload)), "systems": {}}
        iperf, memcpy = report["limits"]["iperf3"], report["limits"]["memcpy"]
        parallel = report["limits"]["iperf3_parallel"]
        moved = 2 * args.workers * nbytes      # every worker pushes and pulls the whole workload
        entry["loopback_floor_ms"] = moved / iperf["bytes_per_s"] * 1e3 if iperf.get("status") == "ok" else None
        entry["parallel_loopback_floor_ms"] = (moved / parallel["bytes_per_s"] * 1e3
                                               if parallel.get("status") == "ok" else None)
        entry["memcpy_floor_ms"] = moved / memcpy["bytes_per_s"] * 1e3
        # what an all-reduce must move instead: 2(n-1)/n of the tensor out of each of n ranks
        ring = 2 * (args.workers - 1) * nbytes
        entry["allreduce_loopback_floor_ms"] = (ring / iperf["bytes_per_s"] * 1e3
                                                if iperf.get("status") == "ok" else None)
        for system in systems:
            if system in report["skipped"]:
                entry["systems"][system] = {"status": "skipped", "reason": report["skipped"][system]}
                continue
            if workload in args.skip_baseline and system != "rdmakv":
                entry["systems"][system] = {"status": "skipped", "reason": "--skip-baseline " + workload}
                continue
            progress(f"{workload}: {system} ...")
            run = ClusterRun(args, system, workload, pythons[system])
            t0 = time.monotonic()
            try:
                result = run.start().run()
                result["loadavg"] = loadavg()[0]
                shutil.rmtree(run.logdir, ignore_errors=True)
            except Exception as exc:   # reported in the table and the JSON, never dropped
                result = {"status": "failed", "reason": str(exc)}
            result["wall_s"] = round(time.monotonic() - t0, 2)
            entry["systems"][system] = result
            progress(f"{workload}: {system}: " + (f"{result['step_ms_median']:.3f} ms, exact={result['exact']}"
                                                  if result["status"] == "ok" else result["reason"]))
        ours = entry["systems"].get("rdmakv", {})
        ratios = {}
        if ours.get("status") == "ok":
            for system, result in entry["systems"].items():
                if system != "rdmakv" and result.get("status") == "ok":
                    ratios[system] = ours["step_ms_median"] / result["step_ms_median"]
            if entry["loopback_floor_ms"]:
                ratios["loopback_floor"] = ours["step_ms_median"] / entry["loopback_floor_ms"]
            if entry["parallel_loopback_floor_ms"]:
                ratios["parallel_loopback_floor"] = ours["step_ms_median"] / entry["parallel_loopback_floor_ms"]
            ratios["memcpy_floor"] = ours["step_ms_median"] / entry["memcpy_floor_ms"]
        entry["rdmakv_ratio"] = ratios
        report["workloads"][workload] = entry
    report["config"]["loadavg_end"] = loadavg()
    report["exact"] = all(r.get("exact", True) for w in report["workloads"].values()
                          for r in w["systems"].values() if r.get("status") == "ok")
    return report


def progress(text):
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_report(report):
    systems = [s for s in SYSTEMS if any(s in w["systems"] for w in report["workloads"].values())]
    cfg = report["config"]
    lines = [f"rdmakv pushpull: {cfg['workers']} workers + {cfg['servers']} server(s) on 127.0.0.1, "
             f"{cfg['cpus']} CPUs, load average {cfg['loadavg_start'][0]:.2f} at start, "
             f"{cfg['loadavg_end'][0]:.2f} at end"]
    iperf, memcpy = report["limits"]["iperf3"], report["limits"]["memcpy"]
    lines.append("loopback: iperf3 one stream " + (f"{iperf['bytes_per_s'] / 1e9:.2f} GB/s ({iperf['gbit_per_s']:.1f} Gbit/s)"
                                                   if iperf.get("status") == "ok" else f"{iperf['status']}: {iperf.get('reason')}")
                 + f"; numpy memcpy {memcpy['bytes_per_s'] / 1e9:.2f} GB/s")
    parallel = report["limits"]["iperf3_parallel"]
    streams = parallel.get("streams", cfg["iperf_streams"])
    lines.append(f"loopback: iperf3 -P {streams} " + (f"{parallel['bytes_per_s'] / 1e9:.2f} GB/s"
                                                      if parallel.get("status") == "ok"
                                                      else f"{parallel['status']}: {parallel.get('reason')}")
                 + f" ({streams} = {cfg['workers']} workers x {cfg['servers']} server(s): rdmakv's TCP connections for "
                 "data, one per worker and server; counted in each run under 'conns')")
    lines.append(f"floor = {2 * cfg['workers']} x workload bytes through loopback at the iperf3 rate (each worker pushes "
                 f"and pulls it once); floor -P = the same at the iperf3 -P {streams} rate; "
                 f"ring floor = {2 * (cfg['workers'] - 1)} x, what an all-reduce such as gloo moves")
    lines.append("")
    head = ["workload"] + [f"{s} ms" for s in systems] + ["floor ms", "ring floor"] + \
        [f"rdmakv/{s}" for s in systems if s != "rdmakv"] + ["rdmakv/floor", "exact", "floor -P ms", "rdmakv/floor -P"]
    rows = [head]
    for name, w in report["workloads"].items():
        row = [name]
        for s in systems:
            r = w["systems"].get(s, {})
            row.append(_fmt(r.get("step_ms_median"), ".3f") if r.get("status") == "ok" else r.get("status", "-"))
        row.append(_fmt(w["loopback_floor_ms"], ".3f"))
        row.append(_fmt(w.get("allreduce_loopback_floor_ms"), ".3f"))
        row += [_fmt(w["rdmakv_ratio"].get(s), ".2f") for s in systems if s != "rdmakv"]
        row.append(_fmt(w["rdmakv_ratio"].get("loopback_floor"), ".2f"))
        ran = [r for r in w["systems"].values() if r.get("status") == "ok"]
        row.append("-" if not ran else "yes" if all(r["exact"] for r in ran) else "NO")
        row.append(_fmt(w.get("parallel_loopback_floor_ms"), ".3f"))
        row.append(_fmt(w["rdmakv_ratio"].get("parallel_loopback_floor"), ".2f"))
        rows.append(row)
    lines += _table(rows)
    lines.append("")
    rows = [["workload", "system", "GB/s/worker", "CPU s/step", "worker MiB", "(harness)", "server MiB", "sched MiB",
             "load", "conns"]]
    for name, w in report["workloads"].items():
        for s in systems:
            r = w["systems"].get(s, {})
            if r.get("status") != "ok":
                continue
            rss = r["peak_rss_bytes_by_role"]
            rows.append([name, s, f"{r['bytes_per_worker_per_s'] / 1e9:.3f}", f"{r['cpu_s_per_step']:.4f}",
                         _fmt(rss.get("worker", 0) / MiB, ".0f"), _fmt(r["worker_harness_bytes"] / MiB, ".0f"),
                         _fmt(rss["server"] / MiB if "server" in rss else None, ".0f"),
                         _fmt(rss["scheduler"] / MiB if "scheduler" in rss else None, ".0f"),
                         f"{r['loadavg']:.2f}", _fmt(r.get("worker_server_tcp_connections"), "d")])
    lines += _table(rows)
    lines.append("peak RSS per role (VmHWM); a worker's includes the harness's own check arrays, shown as (harness); "
                 "CPU s/step sums every process of the cluster; conns = established TCP connections between worker and server "
                 "processes, counted from /proc after the warm-up")
    problems = [f"{name} {s}: {r['status']}: {r['reason']}" for name, w in report["workloads"].items()
                for s, r in w["systems"].items() if r.get("status") != "ok"]
    if problems:
        lines.append("")
        lines += sorted(set(problems))
    return "\n".join(lines)


def _table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report["workloads"])
    systems = [s for s in SYSTEMS if any(w["systems"].get(s, {}).get("status") == "ok"
                                         for w in report["workloads"].values())]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(systems) + 1)
    for k, s in enumerate(systems):
        values = [report["workloads"][n]["systems"].get(s, {}).get("step_ms_median") or 0 for n in names]
        ax.bar([i + k * width for i in range(len(names))], values, width, label=s)
    floors = [report["workloads"][n]["loopback_floor_ms"] or 0 for n in names]
    ax.bar([i + len(systems) * width for i in range(len(names))], floors, width, label="loopback floor",
           color="lightgrey", hatch="//")
    ax.set_xticks([i + width * len(systems) / 2 for i in range(len(names))], names)
    ax.set_yscale("log")
    ax.set_ylabel("step time, median (ms, lower is better)")
    cfg = report["config"]
    ax.set_title(f"pushpull, {cfg['workers']} workers + {cfg['servers']} server, 127.0.0.1 "
                 f"(load {cfg['loadavg_start'][0]:.1f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a CI-sized run: few steps, 1 s of iperf3")
    p.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the step times")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma-separated subset of " + ",".join(SYSTEMS) + " (rdmakv-python: RDMAKV_ENGINE=python)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated, from " + ",".join(WORKLOADS + EXTRA_WORKLOADS))
    p.add_argument("--skip-baseline", default="", metavar="WORKLOADS",
                   help="workloads on which to run rdmakv only (e.g. 64MiB to save time)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="timed steps per workload (default: per workload)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one system may take on one workload")
    p.add_argument("--iperf-seconds", type=int, default=None)
    p.add_argument("--iperf-streams", type=int, default=0, metavar="N",
                   help="parallel streams of the second iperf3 floor (-P N; default: workers x servers, "
                        "the TCP connections rdmakv opens for its data)")
    p.add_argument("--rdmakv-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an RDMAKV_* setting for the rdmakv processes (repeatable), e.g. RDMAKV_SCHEDULING_CREDIT=0")
    p.add_argument("--torch-python", help="interpreter with torch for the gloo baseline (default: this one)")
    p.add_argument("--mxnet-python", help="interpreter with MXNet 1.9.1 (default: this one)")
    # worker mode, used by the driver
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install 'rdmakv[bench]' (or pip install matplotlib)")
    args.systems = [s for s in args.systems.split(",") if s]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.skip_baseline = [w for w in args.skip_baseline.split(",") if w]
    if not all("=" in item for item in args.rdmakv_env):
        p.error("--rdmakv-env takes NAME=VALUE")
    args.rdmakv_env = dict(item.split("=", 1) for item in args.rdmakv_env)
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}")
    for w in args.workloads + args.skip_baseline:
        if w not in WORKLOADS + EXTRA_WORKLOADS:
            p.error(f"unknown workload {w!r}")
    if args.iperf_streams <= 0:
        args.iperf_streams = args.workers * args.servers
    if args.iperf_seconds is None:
        args.iperf_seconds = 1 if args.quick else 3
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.workload, args.rank, args.workers, args.steps, args.warmup)
        return 0
    report = run_all(args)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    if "rdmakv" in report["skipped"]:     # the system under test: a baseline may be missing, rdmakv may not
        print(f"bench_kvstore: rdmakv could not start: {report['skipped']['rdmakv']}", file=sys.stderr)
        return 1
    ours_failed = any(w["systems"].get("rdmakv", {}).get("status") == "failed" for w in report["workloads"].values())
    return 1 if ours_failed or not report["exact"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
