#!/usr/bin/env bash
# Measurements on one soft-RoCE device, each suite in ONE VM run (../shared/rxe-vm).
#
# throughput (the default): perftest's ib_write_bw -F and ib_send_lat -F on
# rxe0, a raw verbs ping-pong in Python (tools/verbs_pingpong.py), then
# tools/bench_transport.py over the verbs and the TCP transports, then
# pushpull of a 1 MiB and a 16 MiB tensor (2 workers, 1 server) over verbs and
# over TCP.  A pushpull moves 4x the tensor through the device (two pushes in,
# two results out), so 4 x size / ib_write_bw is the device's floor for it.
#
# --latency (issue #10's soft-RoCE target): ib_send_lat at 8 B and 4 KiB and
# ib_write_bw at 4 MiB, the raw verbs ping-pong at 4 KiB, then
# tools/bench_kvstore.py --workloads 4KiB,4MiB (2 workers + 1 server,
# RDMAKV_SHM=0) over verbs and over TCP, each with the native engine and with
# the Python data path; last, a summary: the 4 KiB pushpull over ib_send_lat's
# one-way 4 KiB latency, and the 4 MiB pushpull over its device floor.
#
#   usage: ci/rxe_bench.sh [-t SECONDS] [--latency] [--steps N]
#   output: stdout, also docs/rxe_bench.log (throughput) or docs/perf/vm-latency.txt
#   and docs/perf/vm-bench-{verbs,tcp}.json (--latency); the host's load average
#   before and after the VM run is in the log
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${1:-} != --inner ]]; then
    timeout_s=1500 suite=throughput steps=100
    while [[ $# -gt 0 ]]; do
        case $1 in
            -t) timeout_s=$2; shift 2 ;;
            --latency) suite=latency; shift ;;
            --steps) steps=$2; shift 2 ;;
            *) echo "usage: ci/rxe_bench.sh [-t SECONDS] [--latency] [--steps N]" >&2; exit 2 ;;
        esac
    done
    vm="$repo/../shared/rxe-vm/run-in-rxe-vm.sh"
    [[ -f $vm && $(id -u) -eq 0 ]] || { echo "SKIP: needs root and $vm"; exit 0; }
    log=$repo/docs/rxe_bench.log
    [[ $suite == latency ]] && log=$repo/docs/perf/vm-latency.txt
    {
        echo "== host before the VM: $(cat /proc/loadavg) (load average 1/5/15 min), $(nproc) CPUs"
        bash "$vm" -q -C "$repo" -t "$timeout_s" -- bash ci/rxe_bench.sh --inner "$suite" "$steps" 2>&1
        rc=$?
        echo "== host after the VM: $(cat /proc/loadavg); VM exit $rc"
        exit $rc
    } | tee "$log"
    exit "${PIPESTATUS[0]}"
fi
suite=$2 steps=$3

py=${RDMAKV_PYTHON:-$repo/.venv/bin/python}
dev=${RXE_VM_DEVICE:-rxe0}
gid=${RXE_VM_GID_INDEX:-1}
echo "== $(uname -r), $(nproc) vCPUs, device $dev GID index $gid, $(date -u +%FT%TZ), guest load $(cat /proc/loadavg)"

# perftest TOOL SIZE ITERATIONS: its server in the background, its client against it on 127.0.0.1
# once the server listens (under emulation that can take seconds); each side within 300 s.
# The client's report is kept in /tmp/TOOL_SIZE.txt for the summary.
perftest_port=18515
perftest() {
    local port=$((perftest_port++)) waited=0
    echo "== $1 -F -d $dev -x $gid -s $2 -n $3"
    timeout 300 "$1" -F -d "$dev" -x "$gid" -s "$2" -n "$3" -p "$port" >"/tmp/$1_server.log" 2>&1 &
    local server=$!
    until ss -Hltn "sport = :$port" | grep -q .; do
        if ((waited++ > 300)) || ! kill -0 $server 2>/dev/null; then
            echo "$1: its server did not listen on port $port within 60 s:"; cat "/tmp/$1_server.log"; return
        fi
        sleep 0.2
    done
    timeout 300 "$1" -F -d "$dev" -x "$gid" -s "$2" -n "$3" -p "$port" 127.0.0.1 >"/tmp/$1_$2.txt" 2>&1
    grep -A1 "#bytes" "/tmp/$1_$2.txt" || tail -5 "/tmp/$1_$2.txt"
    wait $server
}

if [[ $suite == throughput ]]; then
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
    exit 0
fi

# ---- --latency ----
echo "== perftest in the VM: $(command -v ib_send_lat || echo 'ib_send_lat: not found') " \
     "($(dpkg-query -W -f='${Package} ${Version}' perftest 2>&1))"
for s in 8 4096; do perftest ib_send_lat $s 1000; done
perftest ib_write_bw 4194304 100

echo "== tools/verbs_pingpong.py --size 4096 --count 200"
"$py" tools/verbs_pingpong.py --size 4096 --count 200

bench=(tools/bench_kvstore.py --workloads 4KiB,4MiB --steps "$steps" --iperf-seconds 2
       --rdmakv-env RDMAKV_SHM=0)
echo "== ${bench[*]} --systems rdmakv,rdmakv-python --rdmakv-env RDMAKV_TRANSPORT=verbs"
"$py" "${bench[@]}" --systems rdmakv,rdmakv-python --rdmakv-env RDMAKV_TRANSPORT=verbs \
    --json docs/perf/vm-bench-verbs.json
echo "== ${bench[*]} --systems rdmakv,rdmakv-python --rdmakv-env RDMAKV_TRANSPORT=tcp"
"$py" "${bench[@]}" --systems rdmakv,rdmakv-python --rdmakv-env RDMAKV_TRANSPORT=tcp \
    --json docs/perf/vm-bench-tcp.json

echo "== summary (guest load $(cat /proc/loadavg))"
"$py" - <<'EOF'
import json

def perftest(path, column):
    """Column `column` (0-based) of the result line under perftest's '#bytes' header, or None."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return None
    for head, row in zip(lines, lines[1:]):
        if "#bytes" in head:
            return float(row.split()[column])
    return None

def step_ms(path, system, workload):
    try:
        result = json.load(open(path))["workloads"][workload]["systems"][system]
    except (OSError, KeyError):
        return None
    return result["step_ms_median"] if result.get("status") == "ok" else None

# ib_send_lat: #bytes #iterations t_min t_max t_typical ...; ib_write_bw: #bytes #iterations BW-peak BW-average ...
lat8, lat4k = (perftest(f"/tmp/ib_send_lat_{s}.txt", 4) for s in (8, 4096))
bw = perftest("/tmp/ib_write_bw_4194304.txt", 3)      # perftest's MB/sec are MiB/s (2^20 bytes)
rows = [("verbs, native engine (stream)", "docs/perf/vm-bench-verbs.json", "rdmakv"),
        ("verbs, Python data path", "docs/perf/vm-bench-verbs.json", "rdmakv-python"),
        ("tcp, native engine", "docs/perf/vm-bench-tcp.json", "rdmakv"),
        ("tcp, Python data path", "docs/perf/vm-bench-tcp.json", "rdmakv-python")]
print(f"ib_send_lat one-way, typical: 8 B {lat8} us, 4 KiB {lat4k} us; ib_write_bw 4 MiB: {bw} MiB/s")
floor_4m = 4 * 4 / bw * 1e3 if bw else None
print(f"4 MiB device floor (4 x 4 MiB at ib_write_bw): {floor_4m and round(floor_4m, 1)} ms")
print(f"{'rdmakv pushpull, 2 workers + 1 server':40s} {'4KiB ms':>9s} {'/ send_lat 4KiB':>16s} {'4MiB ms':>9s} "
      f"{'/ device floor':>15s}")
for name, path, system in rows:
    small, large = step_ms(path, system, "4KiB"), step_ms(path, system, "4MiB")
    ratio = lambda a, b: f"{a / b:.1f}x" if a and b else "-"
    value = lambda v, spec: "-" if v is None else format(v, spec)
    print(f"{name:40s} {value(small, '.3f'):>9s} {ratio(small, lat4k and lat4k / 1e3):>16s} "
          f"{value(large, '.1f'):>9s} {ratio(large, floor_4m):>15s}")
EOF
