#!/usr/bin/env python3
"""Does communication go on while the training thread runs Python?

    .venv/bin/python tools/bench_overlap.py [--quick] [--systems rdmakv,mxnet] [--json FILE]

One worker and one server on 127.0.0.1.  For each workload (16 x 4 MiB and
256 x 4 KiB float32 tensors) the worker measures, in alternation, R times each:

  transfer  start a pushpull of every tensor, then wait for all of them
  compute   a pure-Python loop, calibrated to take as long as the transfer
  both      start the pushpulls, run the loop, then wait

overlap = median(both) / max(median(transfer), median(compute)).  1.0 means the
transfer went on entirely behind the Python loop; 2.0 means it stopped while
the loop held the interpreter.  rdmakv runs KVStore.pushpull_async and
Handle.wait; MXNet 1.9.1 dist_sync runs kv.pushpull (its engine is
asynchronous) and mx.nd.waitall.  Every result is checked to be the exact sum.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if REPO not in sys.path:          # runnable as a plain script from a checkout
    sys.path.insert(0, REPO)
sys.path.insert(0, TOOLS)         # beside bench_kvstore.py, in a checkout and once installed
import bench_kvstore  # noqa: E402

from rdmakv.core.netif import free_port  # noqa: E402

SYSTEMS = ("rdmakv", "rdmakv-python", "mxnet")
DEFAULT_SYSTEMS = ("rdmakv", "mxnet")
WORKLOADS = {"16x4MiB": (16, 1 << 20), "256x4KiB": (256, 1 << 10)}   # (tensors, float32 values each)


def python_loop(iterations):
    total = 0
    for i in range(iterations):
        total += i
    return total


def loop_rate():
    """Iterations of python_loop per second here and now."""
    n = 200_000
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        python_loop(n)
        best = min(best, time.perf_counter() - t0)
    return n / best


class RdmakvTensors:
    def __init__(self, count, size):
        import numpy as np
        import rdmakv
        self.np = np
        self.kv = rdmakv.KVStore()
        self.values = [np.full(size, i + 1, np.float32) for i in range(count)]
        self.outs = [np.empty_like(v) for v in self.values]

    def start(self):
        handles = [self.kv.pushpull_async(i, v, out=o, priority=-i) for i, (v, o) in
                   enumerate(zip(self.values, self.outs))]
        return lambda: [h.wait() for h in handles]

    def exact(self):
        n = self.kv.num_workers
        return all(self.np.array_equal(o, v * n) for v, o in zip(self.values, self.outs))

    def close(self):
        self.kv.close()


class MxnetTensors:
    def __init__(self, count, size):
        import mxnet as mx
        self.mx = mx
        self.kv = mx.kv.create("dist_sync")
        self.count = count
        self.values = [mx.nd.full((size,), i + 1, dtype="float32") for i in range(count)]
        self.outs = [mx.nd.zeros((size,), dtype="float32") for _ in range(count)]
        for i, v in enumerate(self.values):
            self.kv.init(i, v)
        mx.nd.waitall()

    def start(self):
        for i in range(self.count):
            self.kv.pushpull(i, self.values[i], out=self.outs[i], priority=-i)
        return self.mx.nd.waitall

    def exact(self):
        n = self.kv.num_workers
        return all((o.asnumpy() == v.asnumpy() * n).all() for v, o in zip(self.values, self.outs))

    def close(self):
        self.mx.nd.waitall()


def worker_main(system, workload, repeats):
    count, size = WORKLOADS[workload]
    tensors = (MxnetTensors if system == "mxnet" else RdmakvTensors)(count, size)

    def transfer():
        t0 = time.perf_counter()
        tensors.start()()
        return time.perf_counter() - t0

    for _ in range(3):
        transfer()                                   # warm-up: declarations, connections, caches
    iterations = int(statistics.median(transfer() for _ in range(5)) * loop_rate())
    times = {"transfer": [], "compute": [], "both": []}
    for _ in range(repeats):
        times["transfer"].append(transfer())
        t0 = time.perf_counter()
        python_loop(iterations)
        times["compute"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        wait = tensors.start()
        python_loop(iterations)
        wait()
        times["both"].append(time.perf_counter() - t0)
    exact = tensors.exact()
    tensors.close()
    print("OVERLAP " + json.dumps({"times": times, "exact": bool(exact)}), flush=True)


def run_one(args, system, workload):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(port), DMLC_NUM_WORKER="1",
               DMLC_NUM_SERVER="1", DMLC_NODE_HOST="127.0.0.1", RDMAKV_TIMEOUT="120", PYTHONUNBUFFERED="1")
    if system == "mxnet":
        env.update(DMLC_INTERFACE="lo", PS_VERBOSE="0")
    else:
        env.update(args.rdmakv_env, **bench_kvstore.RDMAKV_SYSTEMS[system])
    worker = [sys.executable, os.path.abspath(__file__), "--worker", system, "--workload", workload,
              "--repeats", str(args.repeats)]
    if system != "mxnet":
        argv = [sys.executable, "-m", "rdmakv.launch", "-n", "1", "-s", "1", "--"] + worker
        helpers = []
    else:
        argv = worker
        helpers = [subprocess.Popen([sys.executable, "-c", "import mxnet"], env=dict(env, DMLC_ROLE=role),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for role in ("scheduler", "server")]
    try:
        done = subprocess.run(argv, env=dict(env, DMLC_ROLE="worker"), capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"no result within {args.timeout:g} s"}
    finally:
        for proc in helpers:
            proc.kill()
            proc.wait()
    found = [line.split("OVERLAP ", 1)[1] for line in done.stdout.splitlines() if "OVERLAP " in line]
    if done.returncode != 0 or not found:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return {"status": "failed", "reason": f"exit {done.returncode}: " + " | ".join(tail)}
    result = json.loads(found[0])
    medians = {name: statistics.median(values) for name, values in result["times"].items()}
    return {"status": "ok", "exact": result["exact"], "median_ms": {k: v * 1e3 for k, v in medians.items()},
            "overlap": medians["both"] / max(medians["transfer"], medians["compute"]), "times": result["times"]}


def format_report(report):
    rows = [["workload", "system", "transfer ms", "compute ms", "both ms", "overlap", "exact"]]
    for workload, systems in report["workloads"].items():
        for system, r in systems.items():
            if r["status"] != "ok":
                rows.append([workload, system, r["status"], r["reason"], "", "", ""])
                continue
            m = r["median_ms"]
            rows.append([workload, system, f"{m['transfer']:.2f}", f"{m['compute']:.2f}", f"{m['both']:.2f}",
                         f"{r['overlap']:.2f}", "yes" if r["exact"] else "NO"])
    lines = [f"overlap of pushpull with a pure-Python loop: 1 worker + 1 server on 127.0.0.1, "
             f"{report['repeats']} repeats, load average {report['loadavg'][0]:.2f} at start",
             "overlap = both / max(transfer, compute): 1.0 is full overlap, 2.0 none"]
    lines += bench_kvstore._table(rows)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a CI-sized run: 3 repeats")
    p.add_argument("--repeats", type=int, default=0, help="measurements of each kind (default 15)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma-separated subset of " + ",".join(SYSTEMS) + " (rdmakv-python: RDMAKV_ENGINE=python)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from " + ",".join(WORKLOADS))
    p.add_argument("--rdmakv-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an RDMAKV_* setting for the rdmakv processes (repeatable)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one system may take on one workload")
    p.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 15)
    if args.worker:
        worker_main(args.worker, args.workload, args.repeats)
        return 0
    systems = [s for s in args.systems.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    for name, known in [(s, SYSTEMS) for s in systems] + [(w, WORKLOADS) for w in workloads]:
        if name not in known:
            p.error(f"unknown system or workload {name!r}")
    if not all("=" in item for item in args.rdmakv_env):
        p.error("--rdmakv-env takes NAME=VALUE")
    args.rdmakv_env = dict(item.split("=", 1) for item in args.rdmakv_env)
    report = {"repeats": args.repeats, "loadavg": bench_kvstore.loadavg(), "workloads": {}}
    for workload in workloads:
        report["workloads"][workload] = {}
        for system in systems:
            bench_kvstore.progress(f"{workload}: {system} ...")
            report["workloads"][workload][system] = run_one(args, system, workload)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    ran = [r for w in report["workloads"].values() for r in w.values()]
    return 0 if all(r["status"] == "ok" and r["exact"] for r in ran) else 1


if __name__ == "__main__":
    raise SystemExit(main())
