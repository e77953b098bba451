#!/usr/bin/env bash
# Native code checked like native code.
#   1. Our C (rdmakv/native: *.h, wire.c, verbs_stream.c, *_engine.c, codec.c, codecs_byteps.c) compiles with strict warnings; a warning is an error.
#   2. The extension built with AddressSanitizer + UndefinedBehaviorSanitizer runs
#      the native, shared-memory and KVStore tests, and asynchronous mode's core cases.
#   3. The extension built with ThreadSanitizer runs the native, engine and shared-memory tests,
#      and asynchronous mode's core cases on the native data path.
# Python itself is not instrumented: each sanitizer's runtime is preloaded, and
# leak detection is off (the interpreter keeps memory until exit by design).
#
#   bash ci/sanitize.sh          the short pass CI runs (about 5 minutes here)
#   bash ci/sanitize.sh --long   every test under both builds
#   bash ci/sanitize.sh --rdma   the verbs stream's tests and the native KVStore over verbs, under
#                                both builds, inside the soft-RoCE VM (../shared/rxe-vm; about 8 minutes)
# Needs the set-up of ci/setup.sh (.venv); builds in a temporary copy of the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
python=$repo/.venv/bin/python
long=0 rdma=0
[ "${1:-}" = "--long" ] && long=1
[ "${1:-}" = "--rdma" ] && rdma=1
vm=$repo/../shared/rxe-vm/run-in-rxe-vm.sh

for source in rdmakv/native/*.h rdmakv/native/wire.c rdmakv/native/verbs_stream.c rdmakv/native/*_engine.c rdmakv/native/codec.c rdmakv/native/codecs_byteps.c; do
    gcc -std=gnu11 -D_GNU_SOURCE -fsyntax-only -Wall -Wextra -Wshadow -Wstrict-prototypes -Wpointer-arith \
        -Wcast-align -Wvla -Wformat=2 -Werror -Irdmakv/native -x c "$source"
done
echo "ci/sanitize.sh: our C compiles without a warning"

# Not for a sanitizer run: it mounts over libibverbs and runs sh and mount, which
# crash with a sanitizer runtime preloaded; it checks loading, not our C.
deselect=(--deselect tests/test_native.py::test_tcp_works_where_libibverbs_is_absent)

run_build() {    # run_build SANITIZERS RUNTIMES... -- PYTEST ARGS...
    local sanitizers=$1; shift
    local preload=""
    while [ "$1" != "--" ]; do preload+="$(gcc -print-file-name="$1") "; shift; done
    shift
    local tree
    tree=$(mktemp -d /tmp/rdmakv-sanitize.XXXXXX)
    trap 'rm -rf "$tree"' RETURN
    git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tree"
    (cd "$tree" && RDMAKV_SANITIZE=$sanitizers "$python" setup.py -q build_ext --inplace >build.log 2>&1) \
        || { tail -20 "$tree/build.log"; return 1; }
    local module=("$tree"/rdmakv/native/_transport*.so)
    # An uninstrumented build would pass everything: make sure the checks are in.
    local symbols
    symbols=$(nm -D "${module[0]}")     # whole, then searched: grep -q would cut nm's pipe (pipefail)
    grep -q "__[at]san_\|__ubsan_" <<<"$symbols" \
        || { echo "ci/sanitize.sh: ${module[0]} has no $sanitizers instrumentation"; return 1; }
    echo "ci/sanitize.sh: -fsanitize=$sanitizers: pytest $*"
    # --rdma: the same command inside the VM, which sees this tree through the host's file system.
    local runner=()
    ((rdma)) && runner=(bash "$vm" -q -C "$repo" -t 900 --)
    (cd "$tree" && "${runner[@]}" env -C "$tree" LD_PRELOAD="$preload" \
        ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0" \
        "$python" -m pytest -q -p no:cacheprovider "${deselect[@]}" "$@")
}

# Asynchronous mode's core cases (tests/test_async.py), over TCP and shared memory: on both
# data paths under ASan, on the native one under TSan (the Python one runs little C of its own).
# Not the MXNet case: under TSan, MXNet's fork handlers start threads in every child the test
# process forks afterwards, which TSan does not support (the cluster's servers die).  Not the
# stalled broadcast's: its 5 s RDMAKV_TIMEOUT bounds the join too, which a sanitized
# scheduler on a loaded machine can miss (it checks Python's wording; the C is one query).
async_asan=() async_tsan=()
for test in test_a_stalled_worker_does_not_hold_back_the_others test_every_push_is_applied_once_while_workers_race \
            test_the_stored_value_starts_at_init_or_at_a_broadcast \
            test_a_worker_that_does_not_read_its_replies_holds_one_per_chunk_and_nobody_back; do
    for transport in tcp shm; do
        async_tsan+=("tests/test_async.py::$test[$transport-native]")
        async_asan+=("tests/test_async.py::$test[$transport-native]" "tests/test_async.py::$test[$transport-python]")
    done
done

rdma_tests=(tests/rdma/test_verbs_stream.py "tests/rdma/test_verbs_kvstore.py::test_exact_sums_every_dtype_multichunk[native]"
            "tests/rdma/test_verbs_kvstore.py::test_many_keys_priorities_and_broadcast[native]")
if ((rdma)); then
    run_build address,undefined libasan.so libubsan.so -- "${rdma_tests[@]}"
    run_build thread libtsan.so -- "${rdma_tests[@]}"
elif ((long)); then
    run_build address,undefined libasan.so libubsan.so -- tests
    run_build thread libtsan.so -- tests --ignore tests/test_engine_shm.py     # why: see below
else
    run_build address,undefined libasan.so libubsan.so -- tests/test_native.py tests/test_engine.py tests/test_engine_shm.py tests/test_shm.py tests/test_codec.py tests/test_codecs_byteps.py \
        tests/test_kvstore.py "${async_asan[@]}"
    # Not test_engine_shm.py under ThreadSanitizer: it maps both ends of each shared memory in
    # one process, at two addresses, and TSan cannot see that a release through one mapping
    # orders an acquire through the other (in a job, each end is another process).
    run_build thread libtsan.so -- tests/test_native.py tests/test_engine.py tests/test_shm.py "${async_tsan[@]}"
fi
