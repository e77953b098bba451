"""A worker process for the fault tests: multi-chunk pushpulls checked
against numpy, configured from DMLC_*/RDMAKV_* like any rdmakv job.

    python tests/pp_worker.py --rounds 20 --elements 300000 --keys 2 --report DIR

Prints "round R ok" as it goes.  Writes DIR/worker-RANK.json: rounds that
matched numpy exactly, and, if a call failed, the error of the call in flight
("pending") and of one call made after it ("later"), with wall-clock times, so
the test can check how soon and how clearly the failure was reported.  Exits 0
when every round matched, 3 when a call failed, 4 on a wrong sum."""
import argparse
import json
import os
import sys
import time

import numpy as np

import rdmakv


def base(rank, round_, key, elements, dtype):
    """Small integers, so float sums are exact."""
    values = (np.arange(elements, dtype=np.int64) * (key + 3) + round_ * 7 + rank) % 11 - 5
    return values.astype(dtype)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--elements", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--report", required=True)
    parser.add_argument("--marker", default="", help="ignored: lets tests find this process")
    args = parser.parse_args()

    report = {"ok_rounds": 0, "errors": [], "wrong": None, "pid": os.getpid()}
    started = time.time()
    kv = rdmakv.KVStore()
    report["rank"] = kv.rank
    n = kv.num_workers
    path = os.path.join(args.report, f"worker-{kv.rank}.json")
    status = 0
    try:
        for round_ in range(args.rounds):
            handles = []
            for key in range(args.keys):
                value = base(kv.rank, round_, key, args.elements, args.dtype)
                handles.append((key, value, kv.pushpull_async(f"k{key}", value, priority=-key)))
            for key, value, handle in handles:
                handle.wait()
                expected = sum(base(r, round_, key, args.elements, args.dtype).astype(np.int64)
                               for r in range(n)).astype(args.dtype)
                if not np.array_equal(value, expected):
                    bad = int(np.flatnonzero(value != expected)[0])
                    report["wrong"] = f"round {round_} key {key} element {bad}: {value[bad]} != {expected[bad]}"
                    status = 4
                    return status
            report["ok_rounds"] += 1
            print(f"round {round_} ok", flush=True)
    except rdmakv.RdmaKVError as exc:
        report["errors"].append({"call": "pending", "type": type(exc).__name__, "message": str(exc),
                                 "t": time.time()})
        began = time.time()
        try:
            kv.pushpull("k0", base(kv.rank, 0, 0, args.elements, args.dtype))
            report["errors"].append({"call": "later", "type": None, "message": "succeeded", "t": time.time()})
        except rdmakv.RdmaKVError as later:
            report["errors"].append({"call": "later", "type": type(later).__name__, "message": str(later),
                                     "t": time.time(), "took": time.time() - began})
        status = 3
    finally:
        report["elapsed"] = time.time() - started
        if status:
            kv.close(timeout=2)
        else:
            kv.close()
        with open(path + ".tmp", "w") as out:
            json.dump(report, out)
        os.replace(path + ".tmp", path)
        print(f"worker {kv.rank}: {report['ok_rounds']} rounds exact, errors: "
              f"{[e['message'] for e in report['errors']]}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
