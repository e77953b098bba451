#!/usr/bin/env python3
"""Asynchronous against synchronous mode with one straggler.

    .venv/bin/python tools/bench_async.py [--quick] [--workers 3] [--sleep-ms 50] [--steps 40]
                                          [--elements 262144] [--rdmakv-env NAME=VALUE] [--json FILE]

W workers and one server on 127.0.0.1, once with RDMAKV_MODE=sync and once with
RDMAKV_MODE=async, same settings, one after the other in the same run.  Every
worker pushpulls one float32 key of `elements` values for `steps` steps; the
last rank is the straggler and sleeps `sleep-ms` before each of its pushpulls
(its "compute").  Reported: the steps per second of the fast workers (each from
its own first to its last step; the median over them) and of the straggler.
In sync mode a round waits for every worker, so the fast workers step at the
straggler's pace; in async mode each push is applied as it arrives.
Sums are checked: sync, every step is the exact sum of the workers' values;
async, the stored value after everyone's last step is the exact sum of every push.
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

MODES = ("sync", "async")


def worker_main(steps, sleep_ms, elements):
    import numpy as np
    import rdmakv
    with rdmakv.KVStore() as kv:
        straggler = kv.rank == kv.num_workers - 1
        value = np.full(elements, kv.rank + 1, np.float32)     # small integers: exact sums in float32
        each_step = kv.num_workers * (kv.num_workers + 1) // 2
        out = np.empty_like(value)
        kv.pushpull("w", value, out=out)                      # declared and connected before the clock runs
        kv.barrier()
        exact = True
        started = time.perf_counter()
        for _ in range(steps):
            if straggler:
                time.sleep(sleep_ms / 1e3)
            kv.pushpull("w", value, out=out)
            if kv.config.mode == "sync":
                exact = exact and bool((out == each_step).all())
        took = time.perf_counter() - started
        kv.barrier()
        if kv.config.mode == "async":     # a push of zeros reads the stored value: every push, once
            final = kv.pushpull("w", np.zeros_like(value))
            exact = bool((final == each_step * (steps + 1)).all())
        print("ASYNC_BENCH " + json.dumps({"rank": kv.rank, "straggler": straggler, "seconds": took,
                                           "exact": exact}), flush=True)


def run_mode(args, mode):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(port), DMLC_NODE_HOST="127.0.0.1",
               RDMAKV_TIMEOUT="120", PYTHONUNBUFFERED="1", **args.rdmakv_env, RDMAKV_MODE=mode)
    argv = [sys.executable, "-m", "rdmakv.launch", "-n", str(args.workers), "-s", "1", "--",
            sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps),
            "--sleep-ms", str(args.sleep_ms), "--elements", str(args.elements)]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"no result within {args.timeout:g} s"}
    found = [json.loads(line.split("ASYNC_BENCH ", 1)[1]) for line in done.stdout.splitlines()
             if "ASYNC_BENCH " in line]
    if done.returncode != 0 or len(found) != args.workers:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return {"status": "failed", "reason": f"exit {done.returncode}: " + " | ".join(tail)}
    rates = {r["rank"]: args.steps / r["seconds"] for r in found}
    fast = [rates[r["rank"]] for r in found if not r["straggler"]]
    return {"status": "ok", "exact": all(r["exact"] for r in found), "steps_per_s": rates,
            "fast_steps_per_s": statistics.median(fast),
            "straggler_steps_per_s": next(rates[r["rank"]] for r in found if r["straggler"])}


def format_report(report):
    rows = [["mode", "fast workers, steps/s", "straggler, steps/s", "exact"]]
    for mode, r in report["modes"].items():
        if r["status"] != "ok":
            rows.append([mode, r["status"], r["reason"], ""])
            continue
        rows.append([mode, f"{r['fast_steps_per_s']:.1f}", f"{r['straggler_steps_per_s']:.1f}",
                     "yes" if r["exact"] else "NO"])
    s = report["settings"]
    lines = [f"async against sync with one straggler: {s['workers']} workers ({s['workers'] - 1} fast, the last "
             f"sleeping {s['sleep_ms']:g} ms before each step) + 1 server on 127.0.0.1, {s['steps']} steps of "
             f"{s['elements']} float32, load average {report['loadavg'][0]:.2f} at start"]
    lines += bench_kvstore._table(rows)
    modes = report["modes"]
    if all(modes[m]["status"] == "ok" for m in MODES):
        lines.append(f"fast workers, async / sync: "
                     f"{modes['async']['fast_steps_per_s'] / modes['sync']['fast_steps_per_s']:.1f}x")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a CI-sized run: 2 workers, 10 steps of 4,096 values, 20 ms")
    p.add_argument("--workers", type=int, default=0, help="workers, the last the straggler (default 3)")
    p.add_argument("--sleep-ms", type=float, default=0, help="the straggler's sleep before each step (default 50)")
    p.add_argument("--steps", type=int, default=0, help="pushpulls per worker (default 40)")
    p.add_argument("--elements", type=int, default=0, help="float32 values in the key (default 262144: 1 MiB)")
    p.add_argument("--rdmakv-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an RDMAKV_* setting for every process (repeatable)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one mode may take")
    p.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.workers = args.workers or (2 if quick else 3)
    args.sleep_ms = args.sleep_ms or (20 if quick else 50)
    args.steps = args.steps or (10 if quick else 40)
    args.elements = args.elements or (4096 if quick else 262144)
    if args.worker:
        worker_main(args.steps, args.sleep_ms, args.elements)
        return 0
    if args.workers < 2:
        p.error("--workers must be 2 or more: one straggler and at least one fast worker")
    if not all("=" in item for item in args.rdmakv_env):
        p.error("--rdmakv-env takes NAME=VALUE")
    args.rdmakv_env = dict(item.split("=", 1) for item in args.rdmakv_env)
    if "RDMAKV_MODE" in args.rdmakv_env:
        p.error("RDMAKV_MODE is what this tool varies")
    report = {"settings": {"workers": args.workers, "sleep_ms": args.sleep_ms, "steps": args.steps,
                           "elements": args.elements, "rdmakv_env": args.rdmakv_env},
              "loadavg": bench_kvstore.loadavg(), "modes": {}}
    for mode in MODES:
        bench_kvstore.progress(f"{mode} ...")
        report["modes"][mode] = run_mode(args, mode)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(r["status"] == "ok" and r["exact"] for r in report["modes"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
