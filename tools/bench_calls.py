#!/usr/bin/env python3
"""What one pushpull_async call costs its caller, with many small keys.

    .venv/bin/python tools/bench_calls.py [--keys 1024] [--bytes 1024] [--steps 200] [--repeats 5]
                                          [--against DIR] [--json FILE]

One worker and one server (`python -m rdmakv.launch -n 1 -s 1`) over TCP
(RDMAKV_TRANSPORT=tcp, so the native data plane runs).  Every step the worker
calls `pushpull_async(i, value_i, out=out_i, priority=-i)` once per key
(float32, last key first, as a backward pass does), then waits on every
handle, and checks every sum.  Two numbers per run, medians over the steps:

  call      the time to issue the step's calls, divided by the number of keys
  call CPU  the same in the calling thread's CPU time (time.thread_time), which
            other processes taking the CPU (a busy machine) do not inflate
  step      issuing and waiting, the whole step

With --against DIR (another checkout whose extension is built), runs that
import rdmakv from DIR ("before") and from this checkout ("after") alternate,
--repeats times each, and the ratios of the medians (after / before, from the
same run) are printed, for the median run and for the fastest (on a busy
machine other processes only add time)."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)


def worker(keys, nbytes, steps):
    """Runs in the worker process: prints one JSON line of per-step times."""
    import numpy as np
    import rdmakv
    size = nbytes // 4
    values = [np.full(size, i + 1, np.float32) for i in range(keys)]
    outs = [np.empty_like(v) for v in values]
    order = list(reversed(range(keys)))
    calls, cpu, whole = [], [], []
    with rdmakv.KVStore() as kv:
        for step in range(steps + 1):              # step 0 declares the keys: not timed
            for out in outs:
                out.fill(np.nan)
            c0, t0 = time.thread_time(), time.perf_counter()
            handles = [kv.pushpull_async(i, values[i], out=outs[i], priority=-i) for i in order]
            t1, c1 = time.perf_counter(), time.thread_time()
            for handle in handles:
                handle.wait()
            t2 = time.perf_counter()
            if not all(np.array_equal(out, value * kv.num_workers) for value, out in zip(values, outs)):
                raise SystemExit(f"step {step}: a sum is wrong")
            if step:
                calls.append((t1 - t0) / keys)
                cpu.append((c1 - c0) / keys)
                whole.append(t2 - t0)
        print(json.dumps({"rdmakv": os.path.dirname(rdmakv.__file__), "call": calls, "cpu": cpu, "step": whole}), flush=True)


def run_once(tree, args):
    """One cluster importing rdmakv from tree: medians of (call, call CPU, step) in seconds."""
    env = dict(os.environ, RDMAKV_TRANSPORT="tcp", PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "rdmakv.launch", "-n", "1", "-s", "1", "--",
               sys.executable, os.path.abspath(__file__), "--worker", "--keys", str(args.keys),
               "--bytes", str(args.bytes), "--steps", str(args.steps)]
    proc = subprocess.run(command, env=env, cwd="/", capture_output=True, text=True, timeout=args.timeout)
    # the launcher prefixes each line of a node's output with its name ("[worker 0] ")
    lines = [line.partition("] ")[2] for line in proc.stdout.splitlines() if line.startswith("[worker 0] {")]
    if proc.returncode or not lines:
        raise SystemExit(f"the run from {tree} failed (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(lines[-1])
    if os.path.realpath(report["rdmakv"]) != os.path.realpath(os.path.join(tree, "rdmakv")):
        raise SystemExit(f"the run meant for {tree} imported rdmakv from {report['rdmakv']}")
    return tuple(statistics.median(report[name]) for name in ("call", "cpu", "step"))


def _line(medians):
    call, cpu, step = medians
    return f"call {call * 1e6:6.2f} us  call CPU {cpu * 1e6:6.2f} us  step {step * 1e3:7.3f} ms"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1024, help="keys pushpulled per step (default 1024)")
    parser.add_argument("--bytes", type=int, default=1024, help="bytes per key, a multiple of 4 (default 1024)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run (default 200)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each tree (default 5)")
    parser.add_argument("--against", metavar="DIR", help="another checkout to alternate with (the 'before')")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take (default 300)")
    parser.add_argument("--json", metavar="FILE", help="also write every run's medians here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bytes <= 0 or args.bytes % 4:
        parser.error("--bytes must be a positive multiple of 4")
    if args.worker:
        worker(args.keys, args.bytes, args.steps)
        return
    trees = {"after": REPO}
    if args.against:
        trees = {"before": os.path.abspath(args.against), **trees}
    runs = {name: [] for name in trees}
    for repeat in range(args.repeats):
        for name, tree in trees.items():
            medians = run_once(tree, args)
            runs[name].append(medians)
            print(f"run {repeat + 1} {name:6s} {_line(medians)}", flush=True)
    print(f"\n{args.keys} keys x {args.bytes} B, {args.steps} steps per run, {args.repeats} runs of each:")
    overall = {name: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for name, rs in runs.items()}
    fastest = {name: tuple(min(r[i] for r in rs) for i in range(3)) for name, rs in runs.items()}
    for title, table in (("median of the runs", overall), ("fastest run (noise only adds)", fastest)):
        print(f" {title}:")
        for name, medians in table.items():
            print(f"  {name:6s} {_line(medians)}")
        if "before" in table:
            ratios = [after / before for before, after in zip(table["before"], table["after"])]
            print("  after / before: call {:.2f}  call CPU {:.2f}  step {:.2f}".format(*ratios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"keys": args.keys, "bytes": args.bytes, "steps": args.steps, "trees": trees,
                       "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
