"""examples/mxnet_train.py: a real model on real data across 2 workers, run
through the launcher exactly as the README shows."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("mxnet", reason="MXNet 1.9.1 is not installed")
pytest.importorskip("sklearn", reason="scikit-learn (the digits data set) is not installed")

pytestmark = pytest.mark.mxnet
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "mxnet_train.py")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["--update-on-kvstore", "--no-update-on-kvstore"])
def test_example_trains_digits_on_two_workers(mode):
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="60", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "rdmakv.launch", "-n", "2", "-s", "1", "--",
         sys.executable, EXAMPLE, "--epochs", "4", mode],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=280)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-2000:]
    for rank in range(2):
        epochs = re.findall(r"^\[worker %d\] epoch +(\d+) +loss ([\d.]+) .*test-acc ([\d.]+) .*"
                            r"comm ([\d.]+) MB/s" % rank, out, re.M)
        assert [int(e[0]) for e in epochs] == [1, 2, 3, 4], out[-4000:]
        assert float(epochs[-1][1]) < float(epochs[0][1])        # the loss went down
        assert all(float(e[3]) > 0 for e in epochs)
    accuracy = {int(r): float(a) for r, a in
                re.findall(r"^\[worker (\d)\] final test accuracy ([\d.]+)$", out, re.M)}
    checksum = dict(re.findall(r"^\[worker (\d)\] weights sha256 ([0-9a-f]{64})$", out, re.M))
    assert set(accuracy) == {0, 1} and set(checksum) == {"0", "1"}, out[-4000:]
    assert min(accuracy.values()) >= 0.9, accuracy
    assert checksum["0"] == checksum["1"], "workers ended with different weights"
    assert re.search(r"^\[worker 0\] comm throughput [\d.]+ MB/s pushed\+pulled", out, re.M)
