"""A worker for tests/test_mxnet_kvstore.py, started by python -m rdmakv.launch.

    python tests/mxnet_worker.py SCENARIO OUTDIR

Each scenario checks what it can on its own and writes its results to
OUTDIR/<scenario>-<rank>.npz for the test to compare across workers."""
import os
import sys
import time

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon

import rdmakv.mxnet  # registers 'rdmakv'
import rdmakv.mxnet.engine

STEPS = 4
BATCH = 8            # global batch; each of n workers takes BATCH / n rows
ASYNC_STEPS = 60     # async-trainer: steps per worker, and the mean L2 loss it must end below
ASYNC_LOSS_BOUND = 0.01


def api(kv, out):
    n = kv.num_workers
    assert kv.type == "dist_sync_rdmakv" and kv.is_capable("optimizer")
    assert 0 <= kv.rank < n and kv.local_rank >= 0
    shape = (2, 3)
    # The API text's examples.
    a = mx.nd.zeros(shape)
    kv.broadcast("3", mx.nd.ones(shape) * (2 if kv.rank == 0 else 7), out=a)
    np.testing.assert_array_equal(a.asnumpy(), np.full(shape, 2))
    print("api example broadcast:")
    print(a.asnumpy())
    kv.pushpull("3", mx.nd.ones(shape) * 8, out=a)
    np.testing.assert_array_equal(a.asnumpy(), np.full(shape, 8 * n))
    print("api example pushpull:")
    print(a.asnumpy())
    # A list of values is summed locally first; a list of outs all get the result.
    vals = [mx.nd.ones(shape) * (kv.rank + 1), mx.nd.ones(shape)]
    outs = [mx.nd.zeros(shape), mx.nd.zeros(shape, dtype="float32")]
    kv.pushpull(5, vals, out=outs, priority=3)
    expected = sum(r + 2 for r in range(n))
    for o in outs:
        np.testing.assert_array_equal(o.asnumpy(), np.full(shape, expected))
    # out=None: in place, into every value.
    kv.pushpull(5, vals)
    for v in vals:
        np.testing.assert_array_equal(v.asnumpy(), np.full(shape, expected))
    # Asynchronous: many rounds queued, the result is read once.
    acc = mx.nd.ones((1000,), dtype="float64")
    for _ in range(5):
        kv.pushpull("acc", acc)
    np.testing.assert_array_equal(acc.asnumpy(), np.full(1000, float(n) ** 5))
    # Broadcast into a list and in place.
    b = mx.nd.array([kv.rank + 10.0])
    kv.broadcast("b", b, out=None)
    assert b.asscalar() == 10.0
    np.savez(out, a=a.asnumpy(), acc=acc.asnumpy())


def gil_held(kv, out, outdir):
    """On the native engine, MXNet's operator for a pushpull completes, and the engine
    thread that finished it goes on, while worker 0's main thread holds the GIL and
    never lets it go: no Python runs on the way (no done-callback, no deleter)."""
    store = kv._worker.kv
    assert store._engine is not None, "the native engine is not running (RDMAKV_TRANSPORT=tcp runs it)"
    shape = (4096,)
    value = mx.nd.ones(shape) * (kv.rank + 1)
    result = mx.nd.zeros(shape)
    kv.pushpull("g", value, out=result)
    result.wait_to_read()                      # declared; every link is up
    expected = sum(rank + 1 for rank in range(kv.num_workers))
    holding = os.path.join(outdir, "holding")
    if kv.rank == 0:
        earlier = set(store._handles)
        kv.pushpull("g", value, out=result)    # waits on the server for worker 1's push
        probe = mx.nd.zeros(shape)
        probe.wait_to_read()
        result.copyto(probe)                   # MXNet's own operator, run once the pushpull's is complete
        seen = rdmakv.mxnet.engine.numpy_view(probe)
        handle = handed_to_the_engine(store, earlier)
        sys.setswitchinterval(1000.0)          # from here no other thread gets the GIL from this one
        try:
            open(holding, "w").close()         # worker 1 pushes now
            deadline = time.monotonic() + 30
            while seen[0] != expected and time.monotonic() < deadline:
                pass
            completed = seen[0] == expected
            while not handle.done() and time.monotonic() < deadline:
                pass
            finished = handle.done()
        finally:
            sys.setswitchinterval(0.005)
        assert completed, "MXNet's operator did not complete while worker 0 held the GIL"
        assert finished, "the engine thread that completed MXNet's operator waited for the GIL"
    else:
        while not os.path.exists(holding):
            time.sleep(0.01)
        kv.pushpull("g", value, out=result)
    np.testing.assert_array_equal(result.asnumpy(), np.full(shape, expected))
    np.savez(out, result=result.asnumpy())


def handed_to_the_engine(store, earlier):
    """The handle of a pushpull started after the handles in earlier, once the MXNet
    operator that started it has returned (no thread is inside rdmakv.mxnet.engine's
    trampoline, which needs the GIL)."""
    trampoline = rdmakv.mxnet.engine.__file__
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        started = [h for h in list(store._handles) if h not in earlier]
        inside = False
        for frame in sys._current_frames().values():
            while frame is not None and not inside:
                inside = frame.f_code.co_name == "_run" and frame.f_code.co_filename == trampoline
                frame = frame.f_back
        if started and not inside:
            return started[0]
        time.sleep(0.01)
    raise AssertionError("the pushpull never reached the native engine")


def make_net():
    mx.random.seed(42)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(5, in_units=4, activation="tanh"), gluon.nn.Dense(1, in_units=5))
    net.initialize(mx.init.Xavier())
    return net


def data():
    rng = np.random.RandomState(0)
    x = rng.standard_normal((STEPS * BATCH, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.1).reshape(-1, 1)
    return x, y


def train(net, trainer, x, y, steps, rows):
    loss_fn = gluon.loss.L2Loss()
    for step in steps:
        lo = step * BATCH
        xb = mx.nd.array(x[lo:lo + BATCH][rows])
        yb = mx.nd.array(y[lo:lo + BATCH][rows])
        with autograd.record():
            loss = loss_fn(net(xb), yb)
        loss.backward()
        trainer.step(BATCH)        # the global batch: servers sum all workers' gradients


def weights(net):
    """Parameter values in order, named by position (Gluon's names differ per net)."""
    return {"p%d" % i: p.data().asnumpy() for i, p in enumerate(net.collect_params().values())}


def trainer_scenario(kv, out, update_on_kvstore):
    x, y = data()
    rows = slice(kv.rank, None, kv.num_workers)          # this worker's shard
    opt = dict(learning_rate=0.1, momentum=0.9, wd=1e-3)
    net = make_net()
    trainer = gluon.Trainer(net.collect_params(), "sgd", opt, kvstore=kv,
                            update_on_kvstore=update_on_kvstore)
    train(net, trainer, x, y, range(STEPS), rows)
    assert trainer._update_on_kvstore == update_on_kvstore
    got = weights(net)
    # One process training on the union of the shards.
    ref_net = make_net()
    ref = gluon.Trainer(ref_net.collect_params(), "sgd", opt, kvstore=None)
    train(ref_net, ref, x, y, range(STEPS), slice(None))
    for name, w in weights(ref_net).items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6, err_msg=name)
    np.savez(out, **got)


def states_scenario(kv, out, tmpdir):
    """Trainer.save_states / load_states with the optimizer on the servers."""
    x, y = data()
    rows = slice(kv.rank, None, kv.num_workers)
    net = make_net()
    sched = mx.lr_scheduler.FactorScheduler(step=2, factor=0.5, base_lr=0.1)
    trainer = gluon.Trainer(net.collect_params(), "adam", {"lr_scheduler": sched}, kvstore=kv,
                            update_on_kvstore=True)
    train(net, trainer, x, y, range(2), rows)
    states = os.path.join(tmpdir, "trainer-%d.states" % kv.rank)
    trainer.save_states(states)
    saved = [p.data().copy() for p in trainer._params]
    train(net, trainer, x, y, range(2, STEPS), rows)
    straight = weights(net)

    # net.load_parameters() would make the Trainer reset its KVStore, which
    # MXNet refuses for a distributed one: restore the values in place.
    for param, value in zip(trainer._params, saved):
        param.data()[:] = value
    trainer.load_states(states)
    assert isinstance(trainer._optimizer, mx.optimizer.Adam)
    # The servers hold the weights: put the saved ones back (rank 0 sends).
    for i, param in enumerate(trainer._params):
        kv.init(i, param.data())
    kv.barrier()
    train(net, trainer, x, y, range(2, STEPS), rows)
    for name, w in weights(net).items():
        np.testing.assert_array_equal(w, straight[name], err_msg=name)
    np.savez(out, **straight)


def async_scenario(kv, out):
    """Asynchronous mode with SGD on the servers: every push is applied once, exactly
    (small integers at a rate of 1/2), whatever the order they arrive in."""
    assert kv.type == "dist_async_rdmakv"
    n, shape = kv.num_workers, (1000,)
    start = np.arange(1000, dtype=np.float32) % 17

    def grad(rank, step):
        return (np.arange(1000) % 5 - 2 + rank * 3 + step).astype(np.float32)

    kv.set_optimizer(mx.optimizer.SGD(learning_rate=0.5))
    kv.init("w", mx.nd.array(start))              # ends with a barrier in async mode
    result = mx.nd.zeros(shape)
    for step in range(STEPS):
        kv.pushpull("w", mx.nd.array(grad(kv.rank, step)), out=result)
    kv.barrier()
    kv.pushpull("w", mx.nd.zeros(shape), out=result)       # a zero gradient: SGD leaves the weight
    expected = start - 0.5 * sum(grad(rank, step) for rank in range(n) for step in range(STEPS))
    np.testing.assert_array_equal(result.asnumpy(), expected)
    np.savez(out, final=result.asnumpy())


def async_trainer_scenario(kv, out):
    """Gluon's Trainer on 'rdmakv_async' (the optimizer on the servers): the loss of a
    linear model on the whole data set falls below ASYNC_LOSS_BOUND."""
    rng = np.random.RandomState(1)
    x = rng.standard_normal((512, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.1).reshape(-1, 1)
    mx.random.seed(7)
    net = gluon.nn.Dense(1, in_units=4)
    net.initialize(mx.init.Zero())
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=kv)
    loss_fn = gluon.loss.L2Loss()
    first = loss_fn(net(mx.nd.array(x)), mx.nd.array(y)).mean().asscalar()
    rows = np.arange(kv.rank, len(x), kv.num_workers)
    for step in range(ASYNC_STEPS):
        batch = rows[(step * 16) % len(rows):][:16]
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(x[batch])), mx.nd.array(y[batch]))
        loss.backward()
        trainer.step(len(batch))
    assert trainer._update_on_kvstore          # MXNet insists on it for an async store
    kv.barrier()
    last = loss_fn(net(mx.nd.array(x)), mx.nd.array(y)).mean().asscalar()
    print("worker %d: async training loss %.5f -> %.5f" % (kv.rank, first, last))
    assert last < ASYNC_LOSS_BOUND < first, (first, last)
    np.savez(out, first=first, last=last)


def main():
    scenario, outdir = sys.argv[1], sys.argv[2]
    kv = mx.kv.create("rdmakv_async" if scenario.startswith("async") else "rdmakv")
    assert type(kv).__name__ == ("RdmaKVAsync" if scenario.startswith("async") else "RdmaKV")
    out = os.path.join(outdir, "%s-%d.npz" % (scenario, kv.rank))
    try:
        if scenario == "api":
            api(kv, out)
        elif scenario == "trainer-local":
            trainer_scenario(kv, out, update_on_kvstore=False)
        elif scenario == "trainer-kvstore":
            trainer_scenario(kv, out, update_on_kvstore=True)
        elif scenario == "states":
            states_scenario(kv, out, outdir)
        elif scenario == "gil-held":
            gil_held(kv, out, outdir)
        elif scenario == "async":
            async_scenario(kv, out)
        elif scenario == "async-trainer":
            async_trainer_scenario(kv, out)
        else:
            raise SystemExit("unknown scenario %r" % scenario)
        kv.barrier()
    finally:
        kv.close()
    print("worker %d: %s ok" % (kv.rank, scenario))


if __name__ == "__main__":
    main()
