#!/usr/bin/env python3
"""What one pushpull_async call costs its caller, with many small keys.

    .venv/bin/python tools/bench_calls.py [--keys 1024] [--bytes 1024] [--steps 200] [--repeats 5]
                                          [--against DIR] [--json FILE]

One worker and one server (`python -m rdmakv.launch -n 1 -s 1`) over TCP
(RDMAKV_TRANSPORT=tcp, so the native data plane runs).  Every step the worker
calls `pushpull_async(i, value_i, out=out_i, priority=-i)` once per key
(float32, last key first, as a backward pass does), then waits on every
handle, and checks every sum.  Two numbers per run, medians over the steps:

  call  the time to issue the step's calls, divided by the number of keys
  step  issuing and waiting, the whole step

With --against DIR (another checkout whose extension is built), runs that
import rdmakv from DIR ("before") and from this checkout ("after") alternate,
--repeats times each, and the ratios of the medians (after / before, from the
same run) are printed."""
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
    calls, whole = [], []
    with rdmakv.KVStore() as kv:
        for step in range(steps + 1):              # step 0 declares the keys: not timed
            for out in outs:
                out.fill(np.nan)
            t0 = time.perf_counter()
            handles = [kv.pushpull_async(i, values[i], out=outs[i], priority=-i) for i in order]
            t1 = time.perf_counter()
            for handle in handles:
                handle.wait()
            t2 = time.perf_counter()
            if not all(np.array_equal(out, value * kv.num_workers) for value, out in zip(values, outs)):
                raise SystemExit(f"step {step}: a sum is wrong")
            if step:
                calls.append((t1 - t0) / keys)
                whole.append(t2 - t0)
        print(json.dumps({"rdmakv": os.path.dirname(rdmakv.__file__), "call": calls, "step": whole}), flush=True)


def run_once(tree, args):
    """One cluster importing rdmakv from tree: (median call, median step) in seconds."""
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
    return statistics.median(report["call"]), statistics.median(report["step"])


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
            call, step = run_once(tree, args)
            runs[name].append((call, step))
            print(f"run {repeat + 1} {name:6s} call {call * 1e6:6.2f} us  step {step * 1e3:7.3f} ms", flush=True)
    print(f"\n{args.keys} keys x {args.bytes} B, {args.steps} steps per run, median of {args.repeats} runs:")
    medians = {name: tuple(statistics.median(r[i] for r in rs) for i in (0, 1)) for name, rs in runs.items()}
    for name, (call, step) in medians.items():
        print(f"  {name:6s} call {call * 1e6:6.2f} us  step {step * 1e3:7.3f} ms")
    if "before" in medians:
        (call0, step0), (call1, step1) = medians["before"], medians["after"]
        print(f"  after / before: call {call1 / call0:.2f}  step {step1 / step0:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"keys": args.keys, "bytes": args.bytes, "steps": args.steps, "trees": trees,
                       "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
