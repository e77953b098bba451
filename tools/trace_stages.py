#!/usr/bin/env python3
"""Where a pushpull's time goes, from the timelines RDMAKV_TRACE_DIR makes:

    RDMAKV_TRACE_DIR=/tmp/trace python -m rdmakv.launch -n 2 -s 1 -- \\
        python tools/pushpull_time.py --mib 0.00390625 --steps 3000
    python tools/trace_stages.py /tmp/trace

For every worker and every chunk a worker queued, the median time (us) from
`queued` to each later stage: sent by the worker, taken in by the server,
summed (the round's last push in), and the result received by the worker.
All processes trace on the same monotonic clock, so the stages line up across
processes of one host.  The first rounds are skipped (declaration, warm-up)."""
import argparse
import glob
import json
import os
import re
import statistics
from collections import defaultdict

STAGES = ("sent", "push", "summed", "received")


def read_events(path):
    """A trace file's events; one whose process died before finishing it lacks its closing "]}"."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)["traceEvents"]
    except json.JSONDecodeError:
        # One event a line: keep the whole lines and close the list.
        whole = text[:text.rfind("\n")] if not text.endswith("\n") else text
        return json.loads(whole + "\n]}")["traceEvents"]


def load(directory):
    """{(key, chunk, round): {stage name (with the worker for per-worker ones): time in us}}."""
    events = defaultdict(dict)
    for path in glob.glob(os.path.join(directory, "rdmakv-*.json")):
        role, rank = re.match(r"rdmakv-(\w+)-(\d+)\.json$", os.path.basename(path)).groups()
        trace = read_events(path)
        for event in trace:
            args = event.get("args", {})
            if event.get("ph") != "i" or "round" not in args:
                continue
            worker = rank if role == "worker" else args.get("worker")
            stage = event["name"] if worker is None else f"{event['name']} {worker}"
            events[(args["key"], args["chunk"], args["round"])][stage] = event["ts"]
    return events


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--skip-rounds", type=int, default=5)
    args = parser.parse_args()
    events = load(args.directory)
    workers = sorted({stage.split()[1] for stage_times in events.values() for stage in stage_times
                      if stage.startswith("queued ")}, key=int)
    if not workers:
        raise SystemExit(f"no rdmakv traces with queued chunks in {args.directory}")
    for worker in workers:
        print(f"worker {worker}: median us after queued")
        for stage in STAGES:
            name = stage if stage == "summed" else f"{stage} {worker}"
            offsets = [times[name] - times[f"queued {worker}"] for (_, _, rnd), times in events.items()
                       if rnd >= args.skip_rounds and name in times and f"queued {worker}" in times]
            if offsets:
                print(f"  {stage:9s} {statistics.median(offsets):9.1f}   ({len(offsets)} chunks)")


if __name__ == "__main__":
    main()
