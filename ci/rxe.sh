#!/usr/bin/env bash
# Run tests/rdma against a real soft-RoCE device (rxe0) inside the QEMU VM of
# ../shared/rxe-vm.  Extra arguments go to pytest.  Exits 0 with a SKIP line
# where the VM cannot run here (not root, script missing, or its exit 125:
# VM/rxe setup failed), so the project's test command can always call it.
#   usage: ci/rxe.sh [-t SECONDS] [pytest args...]
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
vm="$repo/../shared/rxe-vm/run-in-rxe-vm.sh"
timeout_s=900
if [[ ${1:-} == -t ]]; then timeout_s=$2; shift 2; fi
python=${RDMAKV_PYTHON:-$repo/.venv/bin/python}

skip() { echo "SKIP rdma tests (soft-RoCE VM): $*"; exit 0; }
[[ -f $vm ]] || skip "$vm not found"
[[ $(id -u) -eq 0 ]] || skip "the VM needs root"
[[ -x $python ]] || { echo "ci/rxe.sh: no python at $python (set RDMAKV_PYTHON)" >&2; exit 2; }

bash "$vm" -q -C "$repo" -t "$timeout_s" -- \
    "$python" -m pytest -q -p no:cacheprovider -rs --durations=5 tests/rdma "$@"
rc=$?
case $rc in
    125) skip "the VM or rxe setup failed (exit 125; its console tail is above)" ;;
    124) echo "ci/rxe.sh: the VM run timed out after ${timeout_s}s" >&2 ;;
esac
exit $rc
