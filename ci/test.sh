#!/usr/bin/env bash
# The whole test suite: set-up, then every test on this machine (the KVStore
# suites once per transport, TCP and shared memory, named in each test id), the
# sanitizer builds' short pass, then the RDMA tests inside the soft-RoCE VM
# where one can boot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
# Our C with warnings as errors, and under AddressSanitizer, UBSan and ThreadSanitizer.
bash ci/sanitize.sh
# The verbs tests need a real RDMA device: they run inside the soft-RoCE VM.
bash ci/rxe.sh
# A short pass of the host suite's cluster tests on verbs (all of them: ci/rxe.sh --suite, about 30 min).
bash ci/rxe.sh --suite tests/test_kvstore.py tests/test_allocation.py \
    -k "many_keys_in_flight or broadcast_and_barrier or push_sent_before_its_key"
