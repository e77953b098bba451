#!/usr/bin/env bash
# The main job: set-up, then a local cluster (scheduler, 1 server, 2 workers)
# summing real tensors, checking every sum and printing throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
exec .venv/bin/python -m rdmakv.launch -n 2 -s 1 -- .venv/bin/python examples/pushpull_demo.py "$@"
