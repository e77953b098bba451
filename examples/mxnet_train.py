"""Data-parallel training of a Gluon MLP on scikit-learn's bundled digits
(8x8 images, 1797 samples, no download) through the 'dist_sync_rdmakv' MXNet KVStore.

    python -m rdmakv.launch -n 2 -s 1 -- python examples/mxnet_train.py

A fixed 20% of the images is held out for testing.  Each worker trains on its
own shard of the rest (rows rank::num_workers); the global batch is split
evenly between the workers and the servers sum every worker's gradients.  By
default the servers also run the optimizer (update_on_kvstore=True): workers
push gradients and pull updated weights.  --no-update-on-kvstore sums the
gradients on the servers and lets every worker update its own copy.

Communication throughput counts, per step, every parameter's bytes once pushed
(the gradient) and once pulled (the sum or the new weight), and divides by the
time of the kvstore part of the step alone: the backward pass is finished
first, then the clock runs from trainer.step() until the results are in the
weights (with --no-update-on-kvstore that includes the small local update).
The very first step is left out of it and reported on its own: it sets the
kvstore up (the Trainer broadcasts the weights, sends the optimizer, and each
server imports MXNet to build it).
"""
import argparse
import hashlib
import time

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import rdmakv.mxnet  # noqa: F401 - registers mx.kv.create('dist_sync_rdmakv')

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--batch-size", type=int, default=64, help="global batch, over all workers")
parser.add_argument("--hidden", type=int, default=128)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--update-on-kvstore", action=argparse.BooleanOptionalAction, default=True,
                    help="run the optimizer on the servers (default) or on every worker")
args = parser.parse_args()

kv = mx.kv.create("dist_sync_rdmakv")
rank, n = kv.rank, kv.num_workers
if args.batch_size % n:
    raise SystemExit("--batch-size %d does not split over %d workers" % (args.batch_size, n))
local_batch = args.batch_size // n

digits = load_digits()
x = (digits.data / 16.0).astype(np.float32)         # pixels are 0..16
y = digits.target.astype(np.float32)
x_train, x_test, y_train, y_test = train_test_split(
    x, y, test_size=0.2, random_state=0, stratify=y)
x_shard, y_shard = x_train[rank::n], y_train[rank::n]
# Every worker takes the same number of steps (they meet on every key).
steps = (len(x_train) // n) // local_batch

mx.random.seed(0)       # rank 0's initial weights are broadcast to all anyway
net = gluon.nn.HybridSequential()
net.add(gluon.nn.Dense(args.hidden, activation="relu"), gluon.nn.Dense(10))
net.initialize(mx.init.Xavier())
net.hybridize()
net(mx.nd.zeros((1, x.shape[1])))      # shapes known before the Trainer starts
trainer = gluon.Trainer(net.collect_params(), "sgd",
                        {"learning_rate": args.lr, "momentum": args.momentum},
                        kvstore=kv, update_on_kvstore=args.update_on_kvstore)
loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
param_bytes = sum(p.data().size * np.dtype(p.data().dtype).itemsize
                  for p in net.collect_params().values())


def accuracy(data, labels):
    pred = net(mx.nd.array(data)).argmax(axis=1).asnumpy()
    return float((pred == labels).mean())


if rank == 0:
    print("digits: %d train (%d per worker), %d test; MLP 64-%d-10, %d parameter bytes; "
          "%d workers, global batch %d, optimizer on the %s"
          % (len(x_train), len(x_shard), len(x_test), args.hidden, param_bytes, n,
             args.batch_size, "servers" if args.update_on_kvstore else "workers"))
rng = np.random.RandomState(1 + rank)
total_bytes = total_comm = 0.0
first_step = None
for epoch in range(1, args.epochs + 1):
    order = rng.permutation(len(x_shard))
    loss_sum = correct = seen = 0.0
    comm = 0.0
    start = time.perf_counter()
    for step in range(steps):
        rows = order[step * local_batch:(step + 1) * local_batch]
        xb, yb = mx.nd.array(x_shard[rows]), mx.nd.array(y_shard[rows])
        with autograd.record():
            out = net(xb)
            loss = loss_fn(out, yb)
        loss.backward()
        mx.nd.waitall()                 # the backward pass is done: time only the kvstore part
        t0 = time.perf_counter()
        trainer.step(args.batch_size)   # gradients are summed over every worker's batch
        mx.nd.waitall()                 # the results are in the weights
        if first_step is None:
            first_step = time.perf_counter() - t0
        else:
            comm += time.perf_counter() - t0
        loss_sum += float(loss.sum().asscalar())
        correct += float((out.argmax(axis=1) == yb).sum().asscalar())
        seen += len(rows)
    elapsed = time.perf_counter() - start
    timed = steps - 1 if epoch == 1 else steps
    moved = 2.0 * param_bytes * timed   # pushed + pulled by this worker
    total_bytes += moved
    total_comm += comm
    print("epoch %2d  loss %.4f  train-acc %.4f  test-acc %.4f  %.2fs  comm %.1f MB/s "
          "(%.2f ms kvstore per step)"
          % (epoch, loss_sum / seen, correct / seen, accuracy(x_test, y_test), elapsed,
             moved / comm / 1e6, comm / timed * 1e3))

weights = hashlib.sha256()
for p in net.collect_params().values():
    weights.update(np.ascontiguousarray(p.data().asnumpy()).tobytes())
print("final test accuracy %.4f" % accuracy(x_test, y_test))
print("comm throughput %.1f MB/s pushed+pulled by this worker (%.1f MB in %.2fs of kvstore time; "
      "%d steps of %d keys, %d bytes each way per step; first step %.2fs with set-up, left out)"
      % (total_bytes / total_comm / 1e6, total_bytes / 1e6, total_comm, args.epochs * steps - 1,
         len(net.collect_params().keys()), param_bytes, first_step))
print("weights sha256 %s" % weights.hexdigest())
