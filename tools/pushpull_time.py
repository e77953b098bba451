#!/usr/bin/env python3
"""Time pushpull of one float32 tensor per step on whatever cluster the
environment describes (run it under `python -m rdmakv.launch`):

    RDMAKV_TRANSPORT=verbs python -m rdmakv.launch -n 2 -s 1 -- python tools/pushpull_time.py --mib 16 --steps 10

Each worker checks every sum exactly and prints one line: transport, median
and mean step time, and the algorithm bandwidth (tensor bytes / step time)."""
import argparse
import statistics
import time

import numpy as np

import rdmakv


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=float, default=16)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    n = int(args.mib * (1 << 20)) // 4
    with rdmakv.KVStore() as kv:
        value = np.empty(n, np.float32)
        times = []
        for step in range(args.steps + 1):               # step 0 declares the key: not timed
            value.fill(kv.rank + step)
            kv.barrier()
            start = time.perf_counter()
            kv.pushpull("t", value)
            elapsed = time.perf_counter() - start
            want = sum(r + step for r in range(kv.num_workers))
            if not (value == want).all():
                raise SystemExit(f"step {step}: wrong sum")
            if step:
                times.append(elapsed)
        med = statistics.median(times)
        transport = kv.transport.__name__.replace("rdmakv.transport.", "").replace(" over ", "+")  # shm+tcp
        print(f"PUSHPULL transport={transport} rank={kv.rank} "
              f"MiB={args.mib:g} steps={args.steps} median_ms={med * 1e3:.1f} "
              f"mean_ms={statistics.mean(times) * 1e3:.1f} algbw_MBps={n * 4 / med / 1e6:.1f}", flush=True)


if __name__ == "__main__":
    main()
