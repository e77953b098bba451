#!/usr/bin/env bash
# Throughput on one soft-RoCE device, all in ONE VM run (../shared/rxe-vm):
# perftest's ib_write_bw -F and ib_send_lat -F on rxe0, a raw verbs ping-pong
# in Python (tools/verbs_pingpong.py), then
# tools/bench_transport.py over the verbs and the TCP transports, then
# pushpull of a 1 MiB and a 16 MiB tensor (2 workers, 1 server) over verbs and
# over TCP.  A pushpull moves 4x the tensor through the device (two pushes in,
# two results out), so 4 x size / ib_write_bw is the device's floor for it.
#   usage: ci/rxe_bench.sh [-t SECONDS]      (output: stdout; also docs/rxe_bench.log)
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${1:-} != --inner ]]; then
    timeout_s=1500
    if [[ ${1:-} == -t ]]; then timeout_s=$2; fi
    vm="$repo/../shared/rxe-vm/run-in-rxe-vm.sh"
    [[ -f $vm && $(id -u) -eq 0 ]] || { echo "SKIP: needs root and $vm"; exit 0; }
    bash "$vm" -q -C "$repo" -t "$timeout_s" -- bash ci/rxe_bench.sh --inner 2>&1 | tee "$repo/docs/rxe_bench.log"
    exit "${PIPESTATUS[0]}"
fi

py=${RDMAKV_PYTHON:-$repo/.venv/bin/python}
dev=${RXE_VM_DEVICE:-rxe0}
gid=${RXE_VM_GID_INDEX:-1}
echo "== $(uname -r), $(nproc) vCPUs, device $dev GID index $gid, $(date -u +%FT%TZ)"

# perftest TOOL SIZE ITERATIONS: its server in the background, its client against it on 127.0.0.1
perftest() {
    echo "== $1 -F -d $dev -x $gid -s $2 -n $3"
    "$1" -F -d "$dev" -x "$gid" -s "$2" -n "$3" >"/tmp/$1_server.log" 2>&1 &
    local server=$!
    sleep 1
    "$1" -F -d "$dev" -x "$gid" -s "$2" -n "$3" 127.0.0.1 | grep -A1 "#bytes"
    wait $server
}
for s in 65536 1048576 4194304 16777216; do perftest ib_write_bw $s 100; done
for s in 8 4096; do perftest ib_send_lat $s 1000; done

echo "== tools/verbs_pingpong.py --size 1024 --count 200"
"$py" tools/verbs_pingpong.py --size 1024 --count 200

sizes=1024,16384,65536,1048576,4194304,8388608
for t in verbs tcp; do
    echo "== tools/bench_transport.py --transport $t --sizes $sizes --seconds 0.03"
    "$py" tools/bench_transport.py --transport "$t" --sizes "$sizes" --seconds 0.03 --json "/tmp/bench_$t.json"
done

for mib in 1 16; do
    for t in verbs tcp; do
        echo "== RDMAKV_TRANSPORT=$t python -m rdmakv.launch -n 2 -s 1 -- python tools/pushpull_time.py --mib $mib --steps 5"
        RDMAKV_TRANSPORT=$t RDMAKV_TIMEOUT=120 "$py" -m rdmakv.launch -n 2 -s 1 -- \
            "$py" tools/pushpull_time.py --mib $mib --steps 5 2>&1 | grep -E "PUSHPULL|rror"
    done
done
