#!/usr/bin/env python3
"""pushpull step time over TCP and over shared memory, same invocation:
a scheduler, 1 server and 2 workers on this host (python -m rdmakv.launch),
once per transport, and a numpy memcpy of 64 MiB for the floor.

    .venv/bin/python tools/bench_shm.py [--steps 8] [--json FILE]

Workloads: float32 tensors of 4 MiB and 64 MiB, and ResNet-50's gradient set
(161 tensors, 25,557,032 float32 values) pushed in backward order with
priority=-index and waited on together.  Every step's result is checked to be
the exact sum (values are small integers).  A step is timed from the first
push to the last result, after a barrier; the median over the steps is shown,
for the slower of the two workers."""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def resnet50_shapes():
    """Parameter shapes of torchvision's ResNet-50, in forward order (161 tensors)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for block in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if block == 0:
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    shapes += [(1000, 2048), (1000,)]
    assert len(shapes) == 161 and sum(int(np.prod(s)) for s in shapes) == 25_557_032
    return shapes


WORKLOADS = {
    "4 MiB": [(MiB,)],
    "64 MiB": [(16 * MiB,)],
    "ResNet-50 (161 tensors, 102 MB)": resnet50_shapes(),
}


def worker(steps, out_path):
    import rdmakv
    kv = rdmakv.KVStore()
    results = {}
    for name, shapes in WORKLOADS.items():
        keys = [f"{name}/{i}" for i in range(len(shapes))]
        values = [((np.arange(int(np.prod(s)), dtype=np.int64) + kv.rank) % 7).astype(np.float32).reshape(s)
                  for s in shapes]
        expected = [((np.arange(v.size, dtype=np.int64) % 7) + (np.arange(v.size, dtype=np.int64) + 1) % 7)
                    .astype(np.float32).reshape(v.shape) for v in values]   # worker 0 + worker 1
        outs = [np.empty_like(v) for v in values]
        times = []
        for step in range(steps + 2):                     # two warm-up steps
            kv.barrier()
            start = time.perf_counter()
            handles = [kv.pushpull_async(keys[i], values[i], out=outs[i], priority=-i)
                       for i in reversed(range(len(values)))]
            for handle in handles:
                handle.wait()
            elapsed = time.perf_counter() - start
            if step >= 2:
                times.append(elapsed)
            for out, want in zip(outs, expected):
                if not np.array_equal(out, want):
                    raise SystemExit(f"{name}: wrong sum at step {step}")
        results[name] = {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
                         "bytes": sum(v.nbytes for v in values)}
    kv.close()
    with open(f"{out_path}.{kv.rank}", "w") as out:
        json.dump(results, out)


def run_job(transport, steps, tmp):
    out_path = os.path.join(tmp, transport)
    env = dict(os.environ, RDMAKV_TRANSPORT=transport, PYTHONPATH=REPO)
    env.pop("RDMAKV_SHM", None)
    started = time.monotonic()
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-n", "2", "-s", "1", "--",
                           sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(steps),
                           "--out", out_path], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"{transport} job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    per_worker = []
    for rank in range(2):
        with open(f"{out_path}.{rank}") as source:
            per_worker.append(json.load(source))
    slower = {name: max(w[name]["median_ms"] for w in per_worker) for name in WORKLOADS}
    fastest = {name: max(w[name]["min_ms"] for w in per_worker) for name in WORKLOADS}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - cpu.ru_utime, after.ru_stime - cpu.ru_stime)
    return slower, fastest, (time.monotonic() - started, *cpu_s)


def memcpy_ms(nbytes, repeat=10):
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)           # touched: no page faults in the timed copies
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json")
    parser.add_argument("--only", choices=["tcp", "shm"], help="run one transport (for profiling)")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps, args.out)
    load = os.getloadavg()
    if args.only:
        with tempfile.TemporaryDirectory() as tmp:
            median, best, took = run_job(args.only, args.steps, tmp)
        print(json.dumps({"median_ms": median, "best_ms": best, "wall_user_sys_s": took}, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tcp, tcp_min, tcp_s = run_job("tcp", args.steps, tmp)
        shm, shm_min, shm_s = run_job("shm", args.steps, tmp)
    floor = memcpy_ms(64 * MiB)
    print(f"2 workers + 1 server on this host; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{os.cpu_count()} CPUs; median step of the slower worker over {args.steps} steps, exact sums checked")
    print(f"{'workload':34} {'TCP ms':>9} {'shm ms':>9} {'TCP/shm':>8}   {'best TCP':>9} {'best shm':>9}")
    for name in WORKLOADS:
        print(f"{name:34} {tcp[name]:9.2f} {shm[name]:9.2f} {tcp[name] / shm[name]:8.2f}   "
              f"{tcp_min[name]:9.2f} {shm_min[name]:9.2f}")
    print(f"numpy memcpy of 64 MiB: {floor:.2f} ms; 64 MiB shm step / memcpy = {shm['64 MiB'] / floor:.2f}")
    print("whole jobs, start-up and data generation included (same in both): "
          f"TCP {tcp_s[0]:.1f} s wall, {tcp_s[1]:.1f} s user + {tcp_s[2]:.1f} s sys; "
          f"shm {shm_s[0]:.1f} s wall, {shm_s[1]:.1f} s user + {shm_s[2]:.1f} s sys")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"tcp": tcp, "shm": shm, "tcp_best": tcp_min, "shm_best": shm_min,
                       "tcp_wall_user_sys_s": tcp_s, "shm_wall_user_sys_s": shm_s, "memcpy_64MiB_ms": floor, "loadavg": load}, out, indent=1)


if __name__ == "__main__":
    main()
