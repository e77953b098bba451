#!/usr/bin/env python3
"""Training over a throttled link, with each gradient compression side by side.

    .venv/bin/python tools/bench_compression.py [--quick] [--rate-mbit 1000] [--steps N]
                                                [--only none,onebit+ef,...] [--json FILE]

Needs root (network namespaces and tc); run from a checkout (it uses
tests/netns.py).  Three namespaces stand for three machines: the scheduler
and one server on "ps", one worker on each of "w0" and "w1", joined through
a router namespace by veth pairs.  Every host's link is shaped to --rate-mbit
in both directions (tc tbf on both ends of its veth pair; tc netem's rate
would do the same, where the kernel has netem).  The workers reach the server
over TCP on those links.

For each compression in turn, on the same links, a fresh job trains the same
model from the same initial weights on the same data: a 2-layer MLP (ReLU,
softmax cross-entropy) in numpy, on a synthetic, learnable classification
task (labels are the argmax of a fixed random linear map of Gaussian inputs),
each worker on its own shard, plain SGD on the averaged pulled gradient.  The
weight matrices' gradients are compressed (BYTEPS-style: the biases, under
MIN_COMPRESSED elements, go whole).  It reports, per compression: the median
step time (forward, backward, pushpull of every gradient, update), the bytes
that crossed the server's link per step (its veth counters, both directions),
and the final loss and accuracy on a held-out set, each also as a ratio to no
compression.

The worker side of a job is this file run with --worker (its settings in
BENCH_* environment variables); worker 0 prints its result as one JSON line.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:          # runnable as a plain script from a checkout
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

# name: the compression setting, as a user gives it (rdmakv/core/compression.py)
CONFIGS = {
    "none": None,
    "fp16": "fp16",
    "2bit": {"type": "2bit", "threshold": 0.01},
    "onebit+ef": {"compressor": "onebit", "scaling": True, "ef": "vanilla"},
    "topk+ef": {"compressor": "topk", "k": 0.01, "ef": "vanilla"},
    "randomk+ef": {"compressor": "randomk", "k": 0.01, "ef": "vanilla", "seed": 1},
    "dithering": {"compressor": "dithering", "k": 4, "normalize": "max", "seed": 1},
}
# (inputs, hidden units, classes, batch per worker, steps, learning rate)
FULL = dict(inputs=512, hidden=1024, classes=10, batch=64, steps=200, lr=0.2)
QUICK = dict(inputs=64, hidden=128, classes=10, batch=32, steps=8, lr=0.2)
MIN_COMPRESSED = 4096             # elements: smaller gradients (the biases) are sent whole
TRAIN, TEST = 20000, 4000
WARMUP = 3                        # steps left out of the step time (connections, first declarations)


# ---- the worker: a real training job ------------------------------------------------
def dataset(inputs, classes):
    rng = np.random.default_rng(1)
    teacher = rng.standard_normal((inputs, classes)).astype(np.float32)
    x = rng.standard_normal((TRAIN + TEST, inputs)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1)
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def initial_weights(inputs, hidden, classes):
    rng = np.random.default_rng(2)
    return [(rng.standard_normal((inputs, hidden)) * np.sqrt(2 / inputs)).astype(np.float32),
            np.zeros(hidden, np.float32),
            (rng.standard_normal((hidden, classes)) * np.sqrt(1 / hidden)).astype(np.float32),
            np.zeros(classes, np.float32)]


def forward(weights, x):
    w1, b1, w2, b2 = weights
    hidden = x @ w1 + b1
    logits = np.maximum(hidden, 0) @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    return hidden, prob


def loss_and_gradients(weights, x, y):
    w1, b1, w2, b2 = weights
    hidden, prob = forward(weights, x)
    n = len(y)
    loss = float(-np.log(prob[np.arange(n), y] + 1e-12).mean())
    dlogits = prob
    dlogits[np.arange(n), y] -= 1
    dlogits /= n
    relu = np.maximum(hidden, 0)
    dhidden = (dlogits @ w2.T) * (hidden > 0)
    return loss, [x.T @ dhidden, dhidden.sum(0), relu.T @ dlogits, dlogits.sum(0)]


def evaluate(weights, x, y):
    _, prob = forward(weights, x)
    return float(-np.log(prob[np.arange(len(y)), y] + 1e-12).mean()), float((prob.argmax(1) == y).mean())


def worker():
    import rdmakv
    settings = json.loads(os.environ["BENCH_SETTINGS"])
    compression = json.loads(os.environ["BENCH_COMPRESSION"])
    kv = rdmakv.KVStore()
    x, y, x_test, y_test = dataset(settings["inputs"], settings["classes"])
    shard = slice(kv.rank, None, kv.num_workers)
    x, y = x[shard], y[shard]
    weights = initial_weights(settings["inputs"], settings["hidden"], settings["classes"])
    keys = ["w1", "b1", "w2", "b2"]
    for key, value in zip(keys, weights):
        kv.declare(key, value.shape, "float32", compression=compression if value.size >= MIN_COMPRESSED else "none")
    rng = np.random.default_rng(10 + kv.rank)
    step_times = []
    lr = np.float32(settings["lr"] / kv.num_workers)
    for _ in range(settings["steps"]):
        started = time.perf_counter()
        batch = rng.integers(0, len(y), settings["batch"])
        _, grads = loss_and_gradients(weights, x[batch], y[batch])
        # Last layer first: its gradient is ready first in a real backward pass.
        handles = [kv.pushpull_async(key, np.ascontiguousarray(grad, np.float32), priority=-index)
                   for index, (key, grad) in enumerate(zip(keys, grads))]
        for weight, handle in zip(weights, handles):
            weight -= lr * handle.wait()
        step_times.append(time.perf_counter() - started)
    loss, accuracy = evaluate(weights, x_test, y_test)
    kv.barrier()
    if kv.rank == 0:
        print("BENCH " + json.dumps({"step_s": statistics.median(step_times[WARMUP:] or step_times),
                                     "loss": loss, "accuracy": accuracy}), flush=True)
    kv.close()


# ---- the driver: namespaces, shaped links, one job per compression ---------------------
def shape_links(topology, rate_mbit):
    """tc tbf at rate_mbit on both ends of every host's veth pair: each direction of each link."""
    import netns
    burst = max(32 * 1024, rate_mbit * 1000 * 1000 // 8 // 250)     # a 4 ms burst, at least 32 KiB
    for host in topology.hosts.values():
        for namespace, device in ((topology.router, host.router_link), (host.namespace, host.link)):
            netns.run_in(namespace, "tc", "qdisc", "replace", "dev", device, "root", "tbf",
                         "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms")


def link_bytes(topology, host):
    """Bytes through host's link, both directions (the router's end of its veth pair)."""
    import netns
    stats = json.loads(netns.run_in(topology.router, "ip", "-j", "-s", "link", "show", "dev",
                                    topology.hosts[host].router_link).stdout)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def run_job(topology, name, settings, timeout):
    from rdmakv.core.netif import free_port
    ps = topology.hosts["ps"]
    env = dict(os.environ, PYTHONPATH=REPO, DMLC_PS_ROOT_URI=ps.ipv4, DMLC_PS_ROOT_PORT=str(free_port()),
               DMLC_NUM_WORKER="2", DMLC_NUM_SERVER="1", RDMAKV_TRANSPORT="tcp", RDMAKV_TIMEOUT=str(timeout),
               BENCH_SETTINGS=json.dumps(settings), BENCH_COMPRESSION=json.dumps(CONFIGS[name]))
    before = link_bytes(topology, "ps")
    procs = [topology.spawn("ps", [sys.executable, "-m", "rdmakv.server"], dict(env, DMLC_ROLE=role),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for role in ("scheduler", "server")]
    workers = [topology.spawn(host, [sys.executable, os.path.abspath(__file__), "--worker"],
                              dict(env, DMLC_ROLE="worker"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for host in ("w0", "w1")]
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in workers]
        for proc in procs:
            proc.wait(timeout=30)
    finally:
        for proc in procs + workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(proc.returncode, err) for proc, (_, err) in zip(workers, outputs) if proc.returncode != 0]
    if failed:
        raise RuntimeError(f"{name}: a worker exited with status {failed[0][0]}:\n{failed[0][1][-3000:]}")
    # worker 0 reports; the scheduler numbers workers in the order they join
    result = json.loads(next(line[6:] for out, _ in outputs for line in out.splitlines() if line.startswith("BENCH ")))
    result["wire_bytes_per_step"] = (link_bytes(topology, "ps") - before) / settings["steps"]
    return result


def report(results, rate_mbit, settings):
    base = results["none"] if "none" in results else None
    lines = [f"2 workers + 1 server on network namespaces, every link shaped to {rate_mbit} Mbit/s (tc tbf); "
             f"MLP {settings['inputs']}-{settings['hidden']}-{settings['classes']}, "
             f"batch {settings['batch']} per worker, {settings['steps']} steps, lr {settings['lr']}",
             f"{'compression':<12} {'step ms':>8} {'x none':>7} {'MB/step':>8} {'x none':>7} "
             f"{'test loss':>9} {'x none':>7} {'accuracy':>8} {'x none':>7}"]
    for name, r in results.items():
        def ratio(field):
            return f"{r[field] / base[field]:7.3f}" if base and base[field] else "      -"
        lines.append(f"{name:<12} {r['step_s'] * 1e3:8.1f} {ratio('step_s')} {r['wire_bytes_per_step'] / 1e6:8.3f} "
                     f"{ratio('wire_bytes_per_step')} {r['loss']:9.4f} {ratio('loss')} {r['accuracy']:8.4f} "
                     f"{ratio('accuracy')}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a small model and a few steps (seconds)")
    parser.add_argument("--rate-mbit", type=int, default=1000, help="each link's rate (default 1000: 1 Gbit/s)")
    parser.add_argument("--steps", type=int, help="training steps per job (default 200, --quick 8)")
    parser.add_argument("--only", help=f"comma-separated compressions to run (default all: {', '.join(CONFIGS)})")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.worker:
        return worker()
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown compression(s) {unknown}; known: {', '.join(CONFIGS)}")
    settings = dict(QUICK if args.quick else FULL)
    if args.steps:
        settings["steps"] = args.steps
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import netns
    missing = netns.probe()
    if missing:
        sys.exit(f"bench_compression.py: {missing}")
    netns.remove_stale()
    topology = netns.Topology(["ps", "w0", "w1"])
    results = {}
    try:
        shape_links(topology, args.rate_mbit)
        for name in names:
            results[name] = run_job(topology, name, settings, timeout=60 if args.quick else 600)
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    finally:
        topology.close()
    print(report(results, args.rate_mbit, settings))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"rate_mbit": args.rate_mbit, "settings": settings, "configs": {n: CONFIGS[n] for n in names},
                       "results": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
