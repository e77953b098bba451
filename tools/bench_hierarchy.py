#!/usr/bin/env python3
"""One push per host (RDMAKV_HIERARCHY): step time and the bytes that cross
each host's link, with it and without it, in the same invocation.

    sudo .venv/bin/python tools/bench_hierarchy.py [--quick] [--steps 20] [--rate 1gbit] [--json FILE]

Three network namespaces stand for three machines (tests/netns.py: veth pairs
to a router namespace): hosts h1 and h2 run three workers each (ranks 0-2 on
h1, 3-5 on h2), ps runs the scheduler and the server(s).  The same job runs
twice, RDMAKV_HIERARCHY=1 then 0; each worker pushpulls every key every step
and checks each result against numpy's sum of what all six pushed (small
integers in every dtype: exact).  Bytes are the router's counters of h1's and
h2's veth links (both directions, everything the job sent: control messages
too) over the whole job; a step is timed from the first push to the last
result, after a barrier, and the median over the steps of the slowest worker
is shown.  --rate limits h1's and h2's links to that rate each way (tc tbf on
both ends), as a datacenter NIC shared by a host's workers would.  Needs root
(namespaces)."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import netns  # noqa: E402  (the test suite's namespace helpers, shared)

MiB = 1 << 20
WORKER_HOSTS = ("h1", "h2")
PER_HOST = 3
# (key, dtype, items): the full run's workload; --quick divides the sizes by 16
WORKLOAD = [("grad/float32", "float32", 4 * MiB // 4), ("grad/int32", "int32", MiB // 4),
            ("grad/float64", "float64", MiB // 8), ("grad/int64", "int64", 64 * 1024 // 8)]


def value_of(dtype, items, rank, step):
    """What rank pushes at step: small integers, so every dtype's sum is exact."""
    return ((np.arange(items, dtype=np.int64) * (rank + 1) + step) % 97).astype(dtype)


def worker(args):
    """One worker of the job (run inside a host's namespace)."""
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import rdmakv
    kv = rdmakv.KVStore()
    report = {"rank": kv.rank, "via_host": kv.host_sums is not None,
              "root": kv.host_sums.is_root if kv.host_sums is not None else None, "checked": 0, "steps": []}
    try:
        workload = [(key, dtype, max(1, items // args.shrink)) for key, dtype, items in WORKLOAD]
        outs = [np.empty(items, dtype) for _, dtype, items in workload]
        for step in range(args.warmup + args.steps):
            if args.die_rank == kv.rank and step == args.die_step:
                os.kill(os.getpid(), 9)
            values = [value_of(dtype, items, kv.rank, step) for _, dtype, items in workload]
            kv.barrier()
            start = time.perf_counter()
            handles = [kv.pushpull_async(key, value, out, priority=-i)
                       for i, ((key, _, _), value, out) in enumerate(zip(workload, values, outs))]
            for handle in handles:
                handle.wait()
            if step >= args.warmup:
                report["steps"].append(time.perf_counter() - start)
            for (key, dtype, items), out in zip(workload, outs):
                expected = sum(value_of(dtype, items, r, step) for r in range(kv.num_workers)).astype(dtype)
                if not np.array_equal(out, expected):
                    raise AssertionError(f"rank {kv.rank} step {step} key {key}: wrong sum")
                report["checked"] += 1
        kv.close()
    except Exception as exc:         # reported to the driver, which decides what it means
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(report), flush=True)
        kv.close()
        sys.exit(1)
    print(json.dumps(report), flush=True)


def link_bytes(topology, host):
    """(bytes from host, bytes to host) on its veth link, as the router counts them."""
    shown = netns.run_in(topology.router, "ip", "-s", "-j", "link", "show", "dev",
                         topology.hosts[host].router_link).stdout
    stats = json.loads(shown)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def run_job(topology, hierarchy, steps, warmup=1, shrink=1, servers=1, die_rank=None, die_step=None,
            timeout=25, worker_argv=None):
    """Run one job; {"workers": [each worker's report], "bytes": {host: (from, to)}, "codes": ...}.
    worker_argv: another worker program, which prints its report as its last JSON line."""
    ps = topology.hosts["ps"].ipv4
    port = 20000 + (os.getpid() * 7 + int(time.monotonic() * 1000)) % 20000
    env = dict(os.environ, PYTHONPATH=REPO, DMLC_PS_ROOT_URI=ps, DMLC_PS_ROOT_PORT=str(port),
               DMLC_NUM_WORKER=str(PER_HOST * len(WORKER_HOSTS)), DMLC_NUM_SERVER=str(servers),
               RDMAKV_TIMEOUT=str(timeout), RDMAKV_HIERARCHY="1" if hierarchy else "0")
    before = {host: link_bytes(topology, host) for host in WORKER_HOSTS}
    nodes = [topology.spawn("ps", [sys.executable, "-m", "rdmakv.server"], dict(env, DMLC_ROLE=role),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for role in ["scheduler"] + ["server"] * servers]
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(steps), "--warmup", str(warmup),
            "--shrink", str(shrink)]
    if die_rank is not None:
        argv += ["--die-rank", str(die_rank), "--die-step", str(die_step)]
    argv = worker_argv or argv
    workers = []
    for index, host in enumerate(WORKER_HOSTS):
        for local in range(PER_HOST):
            rank = index * PER_HOST + local
            workers.append(topology.spawn(host, argv, dict(env, DMLC_ROLE="worker", DMLC_WORKER_ID=str(rank)),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports, logs = [], []
    for proc in workers + nodes:
        try:
            out, err = proc.communicate(timeout=3 * timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        logs.append(err)
        if proc in workers:
            lines = [line for line in (out or "").splitlines() if line.startswith("{")]
            reports.append(json.loads(lines[-1]) if lines else {"error": f"no report (exit {proc.returncode})"})
    after = {host: link_bytes(topology, host) for host in WORKER_HOSTS}
    return {"workers": reports, "codes": [p.returncode for p in workers + nodes], "logs": logs,
            "bytes": {host: (after[host][0] - before[host][0], after[host][1] - before[host][1])
                      for host in WORKER_HOSTS}}


def summary(job, shrink, steps, warmup):
    payload = sum(np.dtype(dtype).itemsize * max(1, items // shrink) for _, dtype, items in WORKLOAD)
    times = [statistics.median(r["steps"]) for r in job["workers"] if r.get("steps")]
    return {"step_ms": 1e3 * max(times) if times else None,
            "bytes_per_host_per_step": {host: sum(b) / (steps + warmup) for host, b in job["bytes"].items()},
            "payload_per_worker_step": payload,
            "checked": sum(r.get("checked", 0) for r in job["workers"]),
            "errors": [r["error"] for r in job["workers"] if "error" in r]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tensors 16 times smaller, 3 steps")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rate", help="limit each worker host's link to this rate each way (tc tbf: 1gbit, 10gbit)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shrink", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--die-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--die-step", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    missing = netns.probe()
    if missing:
        sys.exit(f"bench_hierarchy: {missing}")
    steps = args.steps or (3 if args.quick else 20)
    shrink = 16 if args.quick else 1
    netns.remove_stale()
    topology = netns.Topology(["h1", "h2", "ps"])
    results = {}
    try:
        if args.rate:
            for name in WORKER_HOSTS:
                host = topology.hosts[name]
                for namespace, device in ((topology.router, host.router_link), (host.namespace, host.link)):
                    netns.run_in(namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", args.rate,
                                 "burst", "256k", "latency", "100ms")
        for setting in (1, 0):
            job = run_job(topology, setting, steps, args.warmup, shrink)
            results[f"RDMAKV_HIERARCHY={setting}"] = summary(job, shrink, steps, args.warmup)
            if any(job["codes"]):
                sys.exit(f"bench_hierarchy: RDMAKV_HIERARCHY={setting}: exit codes {job['codes']}\n"
                         + "\n".join(filter(None, job["logs"]))[-4000:])
    finally:
        topology.close()
    payload = results["RDMAKV_HIERARCHY=1"]["payload_per_worker_step"]
    print(f"2 hosts x {PER_HOST} workers, 1 server on a third; {payload / MiB:.2f} MiB pushed per worker "
          f"per step; {steps} steps; links {'limited to ' + args.rate if args.rate else 'unlimited'}")
    print(f"{'setting':<20} {'step (ms)':>10} {'h1 MiB/step':>12} {'h2 MiB/step':>12}")
    for name, r in results.items():
        per = r["bytes_per_host_per_step"]
        print(f"{name:<20} {r['step_ms']:>10.1f} {per['h1'] / MiB:>12.2f} {per['h2'] / MiB:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
