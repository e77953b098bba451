#!/usr/bin/env bash
# Run tests/rdma against a real soft-RoCE device (rxe0) inside the QEMU VM of
# ../shared/rxe-vm.  Extra arguments go to pytest.  Exits 0 with a SKIP line
# where the VM cannot run here (not root, script missing, or its exit 125:
# VM/rxe setup failed), so the project's test command can always call it.
#
# --suite runs instead every cluster test of the host suite on its verbs
# transport (the transport fixture's verbs instances, marked over_verbs): about
# 30 minutes under TCG, so CI runs tests/rdma and three of these, and all of
# them are run by hand.  Its waits are TCG's: the VM run 3600 s unless -t says,
# RDMAKV_TIMEOUT 120 s unless set, the tests' own waits 4x (RDKV_TEST_TIME_SCALE)
# and 900 s a test (a server's first `import mxnet` alone takes 45 s in the VM).
#   usage: ci/rxe.sh [-t SECONDS] [--suite] [pytest args, test files...]
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
vm="$repo/../shared/rxe-vm/run-in-rxe-vm.sh"
timeout_s=
if [[ ${1:-} == -t ]]; then timeout_s=$2; shift 2; fi
selection=(tests/rdma)
default_timeout_s=900
if [[ ${1:-} == --suite ]]; then
    shift
    default_timeout_s=3600
    selection=(-m over_verbs -o timeout=900)
    # The whole suite, unless test files are named: collecting it all takes TCG 2 minutes.
    [[ " $* " == *" tests/"* ]] || selection+=(tests)
    export RDMAKV_TIMEOUT=${RDMAKV_TIMEOUT:-120} RDKV_TEST_TIME_SCALE=${RDKV_TEST_TIME_SCALE:-4}
fi
timeout_s=${timeout_s:-$default_timeout_s}
python=${RDMAKV_PYTHON:-$repo/.venv/bin/python}

skip() { echo "SKIP rdma tests (soft-RoCE VM): $*"; exit 0; }
[[ -f $vm ]] || skip "$vm not found"
[[ $(id -u) -eq 0 ]] || skip "the VM needs root"
[[ -x $python ]] || { echo "ci/rxe.sh: no python at $python (set RDMAKV_PYTHON)" >&2; exit 2; }

bash "$vm" -q -C "$repo" -t "$timeout_s" -- \
    "$python" -m pytest -q -p no:cacheprovider -rs --durations=5 "${selection[@]}" "$@"
rc=$?
case $rc in
    125) skip "the VM or rxe setup failed (exit 125; its console tail is above)" ;;
    124) echo "ci/rxe.sh: the VM run timed out after ${timeout_s}s" >&2 ;;
esac
exit $rc
