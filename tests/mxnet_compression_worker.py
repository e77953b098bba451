"""One worker of tests/test_mxnet_compression.py: SGD on the servers with MXNet's
2bit gradient compression, on MXNet's own dist_sync or on rdmakv.

    python tests/mxnet_compression_worker.py mxnet|rdmakv OUTDIR

Each worker fits its own shard of a linear regression: its gradient, computed
in numpy from the current weight, goes to the servers 2bit-compressed, they sum
the decoded gradients and apply SGD, and the worker pulls the new weight.  On
MXNet: kv.set_gradient_compression, kv.set_optimizer, kv.init, then kv.push and
kv.pull (MXNet 1.9.1's dist_sync refuses pushpull with compression).  On rdmakv:
the same through gluon.Trainer(compression_params=..., update_on_kvstore=True),
unchanged, with a loss whose gradient is the numpy one.  Each writes
the weight after every step to OUTDIR/<system>-<rank>.npz."""
import os
import sys

import numpy as np
import mxnet as mx

SHAPE = (300,)
STEPS = 8
ROWS = 64
LEARNING_RATE = 0.05
COMPRESSION = {"type": "2bit", "threshold": 0.5}


def shard(rank):
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((ROWS, SHAPE[0])).astype(np.float32)
    truth = np.random.default_rng(99).standard_normal(SHAPE).astype(np.float32)
    return x, x @ truth


def gradient(x, y, weight):
    return (x.T @ (x @ weight - y) / ROWS).astype(np.float32)


def start_weight():
    return np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32) * np.float32(0.1)


def on_mxnet():
    kv = mx.kv.create("dist_sync")
    x, y = shard(kv.rank)
    kv.set_gradient_compression(COMPRESSION)
    kv.set_optimizer(mx.optimizer.SGD(learning_rate=LEARNING_RATE, rescale_grad=1.0))
    weight = mx.nd.array(start_weight())
    kv.init("w", weight)              # ends with a barrier on a dist store
    steps = []
    for _ in range(STEPS):
        kv.push("w", mx.nd.array(gradient(x, y, weight.asnumpy())))
        kv.pull("w", out=weight)
        steps.append(weight.asnumpy().copy())
    return kv.rank, steps


def on_rdmakv():
    from mxnet import autograd, gluon
    import rdmakv.mxnet  # noqa: F401 - registers the store
    kv = mx.kv.create("dist_sync_rdmakv")
    assert kv.is_capable("gradient_compression")
    x, y = shard(kv.rank)
    param = gluon.Parameter("w", shape=SHAPE, init=mx.init.Constant(start_weight()))
    param.initialize(ctx=mx.cpu())
    trainer = gluon.Trainer([param], "sgd", {"learning_rate": LEARNING_RATE}, kvstore=kv,
                            compression_params=COMPRESSION, update_on_kvstore=True)
    steps = []
    for _ in range(STEPS):
        # A loss whose gradient is exactly the numpy one: sum(w * g).
        g = mx.nd.array(gradient(x, y, param.data().asnumpy()))
        with autograd.record():
            loss = (param.data() * g).sum()
        loss.backward()
        trainer.step(1)
        steps.append(param.data().asnumpy().copy())
    return kv.rank, steps


def main():
    system, outdir = sys.argv[1], sys.argv[2]
    rank, steps = (on_mxnet if system == "mxnet" else on_rdmakv)()
    np.savez(os.path.join(outdir, "%s-%d.npz" % (system, rank)), steps=np.stack(steps))
    print("worker %d: %s ok" % (rank, system), flush=True)


if __name__ == "__main__":
    main()
