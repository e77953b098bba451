"""MXNet's 2bit gradient compression on rdmakv.mxnet against MXNet 1.9.1's own
dist_sync, side by side on the same data (tests/mxnet_compression_worker.py):
the weights after every step agree, and both agree with numpy's simulation of
MXNet's 2bit (tests/codec_reference.py)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import codec_reference as ref
from rdmakv.core.netif import free_port

mx = pytest.importorskip("mxnet")
import mxnet_compression_worker as job  # noqa: E402

pytestmark = pytest.mark.mxnet
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "mxnet_compression_worker.py")
WORKERS = 2


def run_rdmakv(outdir):
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="60")
    proc = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-n", str(WORKERS), "-s", "1", "--",
                           sys.executable, WORKER, "rdmakv", str(outdir)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def run_mxnet(outdir):
    """MXNet's dist_sync on its own ps-lite: a scheduler and a server (`import mxnet`
    with DMLC_ROLE set) and the workers, over loopback."""
    env = dict(os.environ, PYTHONPATH=REPO, DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(free_port()),
               DMLC_NUM_WORKER=str(WORKERS), DMLC_NUM_SERVER="1", DMLC_NODE_HOST="127.0.0.1",
               DMLC_INTERFACE="lo", PS_VERBOSE="0")
    helpers = [subprocess.Popen([sys.executable, "-c", "import mxnet"], env=dict(env, DMLC_ROLE=role),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for role in ("scheduler", "server")]
    workers = []
    try:
        for _ in range(WORKERS):
            workers.append(subprocess.Popen([sys.executable, WORKER, "mxnet", str(outdir)],
                                            env=dict(env, DMLC_ROLE="worker"), stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True))
        for worker in workers:
            output, _ = worker.communicate(timeout=120)
            assert worker.returncode == 0, output[-4000:]
        for helper in helpers:
            helper.wait(30)
    finally:
        for proc in helpers + workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def simulate():
    """numpy: each worker's 2bit encoding of its gradient (residual kept), the decoded sum, SGD."""
    weight = job.start_weight()
    residuals = [np.zeros(job.SHAPE, np.float32) for _ in range(WORKERS)]
    shards = [job.shard(rank) for rank in range(WORKERS)]
    steps = []
    for _ in range(job.STEPS):
        total = np.zeros(job.SHAPE, np.float32)
        for rank, (x, y) in enumerate(shards):
            data, residuals[rank] = ref.twobit_encode(job.gradient(x, y, weight), residuals[rank],
                                                      job.COMPRESSION["threshold"])
            total += ref.twobit_decode(data, job.SHAPE[0], job.COMPRESSION["threshold"])
        weight = weight - np.float32(job.LEARNING_RATE) * total
        steps.append(weight)
    return np.stack(steps)


@pytest.mark.timeout(300)
def test_2bit_sgd_matches_mxnets_own_dist_sync(tmp_path):
    run_mxnet(tmp_path)
    run_rdmakv(tmp_path)
    mxnet = [np.load(tmp_path / ("mxnet-%d.npz" % r))["steps"] for r in range(WORKERS)]
    rdmakv = [np.load(tmp_path / ("rdmakv-%d.npz" % r))["steps"] for r in range(WORKERS)]
    for steps in mxnet[1:] + rdmakv:
        np.testing.assert_allclose(steps, mxnet[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rdmakv[0], simulate(), rtol=1e-5, atol=1e-6)
    # Compression did something: every step moved each weight by a multiple of lr * threshold.
    moves = np.diff(np.concatenate([job.start_weight()[None], rdmakv[0]]), axis=0)
    quantum = job.LEARNING_RATE * job.COMPRESSION["threshold"]
    np.testing.assert_allclose(moves / quantum, np.round(moves / quantum), atol=1e-3)
    assert np.count_nonzero(np.round(moves / quantum)) > moves.size // 4


def test_set_gradient_compression_takes_mxnets_params_and_refuses_bad_ones_as_mxnet_does():
    import rdmakv.mxnet  # noqa: F401 - registers the store
    kv = mx.kv.create("dist_sync_rdmakv")      # no job settings: a one-worker job in this process
    try:
        assert kv.is_capable("gradient_compression")
        for params, message in [({"type": "1bit"}, "Unknown type for gradient compression '1bit'"),
                                ({"type": "2bit", "threshold": 0}, "threshold must be greater than 0"),
                                ({}, "Required parameter type"), ("2bit", "Required parameter type")]:
            with pytest.raises(mx.base.MXNetError, match=message):
                kv.set_gradient_compression(params)
        kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
        kv.init(3, mx.nd.zeros((20,)))
        with pytest.raises(mx.base.MXNetError, match="before any key is initialized"):
            kv.set_gradient_compression({"type": "2bit"})
        out = mx.nd.zeros((20,))
        kv.pushpull(3, mx.nd.array(np.linspace(-1, 1, 20)), out=out)
        np.testing.assert_array_equal(out.asnumpy(), ref.twobit_decode(
            ref.twobit_encode(np.linspace(-1, 1, 20).astype(np.float32), np.zeros(20, np.float32), 0.5)[0], 20, 0.5))
    finally:
        kv.close()
