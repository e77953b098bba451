"""The main job: every worker sums a mixed set of tensors with all the others,
checks each result against numpy, and reports throughput.

    python -m rdmakv.launch -n 2 -s 1 -- python examples/pushpull_demo.py
"""
import argparse
import time

import numpy as np

import rdmakv

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=20)
parser.add_argument("--mib", type=float, default=16.0, help="size of the large tensor in MiB")
args = parser.parse_args()

with rdmakv.KVStore() as kv:
    n = kv.num_workers
    tensors = {
        "embedding": np.full((int(args.mib * 2**20) // 4,), kv.rank + 1, np.float32),
        "conv1.weight": np.arange(64 * 3 * 7 * 7, dtype=np.float32).reshape(64, 3, 7, 7) * (kv.rank + 1),
        "fc.bias": np.full(1000, kv.rank, np.float64),
        "step": np.array(kv.rank + 1, np.int64),
        "counts": np.arange(10_000, dtype=np.int32) * (kv.rank + 1),
    }
    expected = {name: sum(value / (kv.rank + 1) * (r + 1) for r in range(n)) if name != "fc.bias"
                else np.full(1000, sum(range(n)), np.float64) for name, value in tensors.items()}
    outputs = {name: np.empty_like(value) for name, value in tensors.items()}
    total = sum(v.nbytes for v in tensors.values())
    kv.barrier()
    start = time.perf_counter()
    for _ in range(args.rounds):
        handles = [kv.pushpull_async(name, value, out=outputs[name], priority=-index)
                   for index, (name, value) in enumerate(tensors.items())]
        for handle in handles:
            handle.wait()
    elapsed = time.perf_counter() - start
    for name, out in outputs.items():
        np.testing.assert_array_equal(out, expected[name])
    kv.barrier()
    print(f"worker {kv.rank}/{n}: {len(tensors)} tensors ({total / 2**20:.1f} MiB) x {args.rounds} rounds, "
          f"all sums exact; e.g. step = {int(outputs['step'])}, counts[1] = {int(outputs['counts'][1])}")
    print(f"worker {kv.rank}: {elapsed / args.rounds * 1e3:.2f} ms per round, "
          f"{total * args.rounds / elapsed / 1e9:.2f} GB/s pushed and {total * args.rounds / elapsed / 1e9:.2f} "
          f"GB/s pulled per worker")
