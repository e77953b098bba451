#!/usr/bin/env bash
# RDMAKV_SPIN_US on the native engine over verbs, in one boot of the soft-RoCE VM (issue #10:
# "busy-poll where it pays ... measure it on the soft-RoCE VM"): a 4 KiB pushpull, 2 workers +
# 1 server, at each spin budget, every run in the same boot.
#   usage (host, root): bash ../shared/rxe-vm/run-in-rxe-vm.sh -q -C "$PWD" -t 1500 -- bash tools/vm_spin.sh
#   output: stdout, and docs/perf/vm-spin.txt
set -uo pipefail
cd "$(dirname "$0")/.."
py=${RDMAKV_PYTHON:-.venv/bin/python}
{
    echo "== guest: $(nproc) vCPUs, load $(cat /proc/loadavg)"
    for spin in 0 50 200; do
        echo "== RDMAKV_SPIN_US=$spin"
        "$py" tools/bench_kvstore.py --systems rdmakv --workloads 4KiB --steps 100 --iperf-seconds 1 \
            --rdmakv-env RDMAKV_SHM=0 --rdmakv-env RDMAKV_TRANSPORT=verbs --rdmakv-env RDMAKV_SPIN_US=$spin 2>&1 \
            | grep -E "^\[bench\] 4KiB: rdmakv:|^4KiB +[0-9]|load average"
    done
} | tee docs/perf/vm-spin.txt
