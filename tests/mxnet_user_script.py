"""A training script written the way MXNet users write them, for
tests/test_mxnet_exit.py: the store is named by string, created more than once,
and never closed.  Started by python -m rdmakv.launch.

    python tests/mxnet_user_script.py API NAME OUTDIR

API is "trainer" (gluon.Trainer) or "module" (Module.fit).  The script learns
its rank from one mx.kv.create(NAME), creates two more stores (the last one, or
the name itself for Module.fit, trains), and writes its final weights and those
of one process training on the union of the shards to OUTDIR/<rank>.npz."""
import os
import sys

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon

import rdmakv.mxnet  # noqa: F401 - registers the names

STEPS = 4
BATCH = 8            # global batch; each of n workers takes BATCH / n rows


def data():
    rng = np.random.RandomState(0)
    x = rng.standard_normal((STEPS * BATCH, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.1).reshape(-1, 1)
    return x, y


def gluon_weights(kvstore, rows):
    mx.random.seed(42)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(5, in_units=4, activation="tanh"), gluon.nn.Dense(1, in_units=5))
    net.initialize(mx.init.Xavier())
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9},
                            kvstore=kvstore)
    x, y = data()
    loss_fn = gluon.loss.L2Loss()
    for step in range(STEPS):
        lo = step * BATCH
        xb, yb = mx.nd.array(x[lo:lo + BATCH][rows]), mx.nd.array(y[lo:lo + BATCH][rows])
        with autograd.record():
            loss = loss_fn(net(xb), yb)
        loss.backward()
        trainer.step(BATCH)
    return [p.data().asnumpy() for p in net.collect_params().values()]


def module_weights(kvstore, rows, local_batch):
    mx.random.seed(42)
    data_sym = mx.sym.Variable("data")
    hidden = mx.sym.Activation(mx.sym.FullyConnected(data_sym, num_hidden=5, name="fc1"), act_type="tanh")
    out = mx.sym.LinearRegressionOutput(mx.sym.FullyConnected(hidden, num_hidden=1, name="fc2"), name="lro")
    x, y = data()
    it = mx.io.NDArrayIter(x.reshape(STEPS, BATCH, 4)[:, rows].reshape(-1, 4),
                           y.reshape(STEPS, BATCH, 1)[:, rows].reshape(-1), batch_size=local_batch,
                           label_name="lro_label")
    mod = mx.mod.Module(out, label_names=["lro_label"], context=mx.cpu())
    mod.fit(it, num_epoch=1, kvstore=kvstore, optimizer="sgd",
            optimizer_params={"learning_rate": 0.1, "momentum": 0.9},
            initializer=mx.init.Xavier())
    args, _ = mod.get_params()
    return [args[name].asnumpy() for name in sorted(args)]


def main():
    api, name, outdir = sys.argv[1:4]
    kv = mx.kv.create(name)                  # to learn the rank, as scripts do
    rank, n = kv.rank, kv.num_workers
    assert mx.kv.create(name).rank == rank   # a second create: the same worker
    rows = slice(rank, None, n)
    if api == "trainer":
        got = gluon_weights(mx.kv.create(name), rows)    # the third trains
        ref = gluon_weights(None, slice(None))
    elif api == "module":
        got = module_weights(name, rows, BATCH // n)     # Module.fit creates it from the name
        ref = module_weights(None, slice(None), BATCH)
    else:
        raise SystemExit("unknown API %r" % api)
    np.savez(os.path.join(outdir, "%d.npz" % rank), **{"got%d" % i: w for i, w in enumerate(got)},
             **{"ref%d" % i: w for i, w in enumerate(ref)})
    print("worker %d: %s with %r trained" % (rank, api, name))


if __name__ == "__main__":
    main()
