#!/usr/bin/env bash
# The whole test suite: set-up, then every test on this machine (TCP, and shared
# memory between co-located workers and servers), then the KVStore suites over TCP alone,
# then the RDMA tests inside the soft-RoCE VM where one can boot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
# The run above moves worker-server bytes through shared memory (auto, all on
# one host); the KVStore suites run again with it forbidden, over TCP.
RDMAKV_SHM=0 .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests/test_kvstore.py tests/test_auth.py tests/test_load.py
# The verbs tests need a real RDMA device: they run inside the soft-RoCE VM.
bash ci/rxe.sh
