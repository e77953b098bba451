"""One push per host (RDMAKV_HIERARCHY), for real: three network namespaces
stand for three machines (tests/netns.py), h1 and h2 with three worker
processes each, ps with the scheduler and the server.  The jobs are
tools/bench_hierarchy.py's (each worker checks every result against numpy's
sum of all six pushes, in four dtypes); the bytes are the router's counters
of h1's and h2's veth links."""
import glob
import json
import logging
import os
import subprocess
import sys

import pytest

import netns
from cluster import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import bench_hierarchy as bench  # noqa: E402
from rdmakv.control import hierarchy  # noqa: E402

_missing = netns.probe()
needs_namespaces = pytest.mark.skipif(_missing is not None, reason=str(_missing))
STEPS, WARMUP, SHRINK = 3, 1, 16


@pytest.fixture(scope="module")
def topology():
    netns.remove_stale()
    hosts = netns.Topology(["h1", "h2", "ps"])
    try:
        yield hosts
    finally:
        hosts.close()


def host_files():
    return glob.glob("/dev/shm/rdmakv-host-*")


def payload_bytes():
    """Bytes each worker pushes in a job (and gets back)."""
    per_step = sum(bench.np.dtype(dtype).itemsize * max(1, items // SHRINK) for _, dtype, items in bench.WORKLOAD)
    return per_step * (STEPS + WARMUP)


def explain(job):
    return "\n".join(str(r) for r in job["workers"]) + "\n" + "\n".join(filter(None, job["logs"]))[-3000:]


@needs_namespaces
def test_one_copy_per_host_crosses_the_link_and_sums_are_exact(topology):
    on = bench.run_job(topology, True, STEPS, WARMUP, SHRINK, timeout=20)
    off = bench.run_job(topology, False, STEPS, WARMUP, SHRINK, timeout=20)
    checks = (STEPS + WARMUP) * len(bench.WORKLOAD)
    for job in (on, off):
        assert job["codes"] == [0] * 8, explain(job)
        assert [r["checked"] for r in job["workers"]] == [checks] * 6, explain(job)
    assert [r["root"] for r in on["workers"]] == [True, False, False, True, False, False]
    assert not any(r["via_host"] for r in off["workers"])
    payload = payload_bytes()
    for host in bench.WORKER_HOSTS:
        (up_on, down_on), (up_off, down_off) = on["bytes"][host], off["bytes"][host]
        # With it, one copy of the host's pushes leaves and one copy of the results comes
        # back (plus control messages); without it, one per worker: three.
        assert payload <= up_on < 1.25 * payload, (host, up_on, payload)
        assert payload <= down_on < 1.25 * payload, (host, down_on, payload)
        assert up_off >= 3 * payload and down_off >= 3 * payload, (host, up_off, down_off, payload)
    assert host_files() == []


@needs_namespaces
def test_a_killed_local_root_fails_the_job_naming_it(topology):
    job = bench.run_job(topology, True, STEPS, WARMUP, SHRINK, die_rank=3, die_step=2, timeout=15)
    assert job["codes"][3] == -9
    assert all(code != 0 for code in job["codes"]), explain(job)
    for report in job["workers"][:3] + job["workers"][4:]:      # in rank order
        assert "worker 3 (the local root of host 198.18.2.2)" in report.get("error", ""), explain(job)
    assert host_files() == []


@needs_namespaces
def test_a_killed_local_worker_fails_the_job_naming_it(topology):
    job = bench.run_job(topology, True, STEPS, WARMUP, SHRINK, die_rank=4, die_step=2, timeout=15)
    assert job["codes"][4] == -9
    for report in job["workers"][:4] + job["workers"][5:]:
        assert "worker 4 " in report.get("error", ""), explain(job)


MXNET_WORKER = """
import json
import numpy as np
import mxnet as mx
from mxnet import autograd, gluon
import rdmakv.mxnet

kv = mx.kv.create("rdmakv")
n = kv.num_workers
report = {"rank": kv.rank, "via_host": kv._worker.kv.host_sums is not None, "checked": 0}
total = mx.nd.zeros((4096,), dtype="int32")
kv.init("g", total)
for step in range(3):
    kv.pushpull("g", mx.nd.ones((4096,), dtype="int32") * (kv.rank + step), out=total)
    assert (total.asnumpy() == sum(r + step for r in range(n))).all()
    report["checked"] += 1
# Gluon's Trainer with the optimizer on the servers (their sums go out through Python): every
# worker has the same data.
net = gluon.nn.Dense(1, in_units=4)
net.initialize(mx.init.Constant(0.5))
trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=kv, update_on_kvstore=True)
x = mx.nd.array(np.arange(32).reshape(8, 4) / 32.0)
for step in range(3):
    with autograd.record():
        loss = (net(x) ** 2).sum()
    loss.backward()
    trainer.step(8)
report["weight"] = net.weight.data().asnumpy().ravel().tolist() + net.bias.data().asnumpy().tolist()
print(json.dumps(report), flush=True)
"""


@needs_namespaces
def test_rdmakv_mxnet_pushes_once_per_host_with_the_optimizer_on_the_servers(topology, tmp_path):
    pytest.importorskip("mxnet")
    script = tmp_path / "mxnet_worker.py"
    script.write_text(MXNET_WORKER)
    jobs = [bench.run_job(topology, setting, 0, timeout=40, worker_argv=[sys.executable, str(script)])
            for setting in (True, False)]
    for job, via_host in zip(jobs, (True, False)):
        assert job["codes"] == [0] * 8, explain(job)
        assert [(r["via_host"], r["checked"]) for r in job["workers"]] == [(via_host, 3)] * 6, explain(job)
    # The same weights on every worker of a job; with one push per host and without, the same
    # but for float32 rounding (the host's partial sums add in another order).
    on, off = ([r["weight"] for r in job["workers"]] for job in jobs)
    assert on == [on[0]] * 6 and off == [off[0]] * 6
    bench.np.testing.assert_allclose(on[0], off[0], rtol=1e-6)


@needs_namespaces
def test_bench_hierarchy_quick(tmp_path):
    out = tmp_path / "hierarchy.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_hierarchy.py"), "--quick",
                           "--steps", "2", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RDMAKV_HIERARCHY=1" in proc.stdout and "RDMAKV_HIERARCHY=0" in proc.stdout
    results = json.loads(out.read_text())
    on, off = results["RDMAKV_HIERARCHY=1"], results["RDMAKV_HIERARCHY=0"]
    assert on["errors"] == off["errors"] == []
    for host in bench.WORKER_HOSTS:
        assert on["bytes_per_host_per_step"][host] < 0.5 * off["bytes_per_host_per_step"][host]


# ---- the plan (no processes) ------------------------------------------------------------
def _node(host, host_id, refusal=None):
    return {"host": host, "host_id": host_id, "hierarchy": refusal}


def test_the_plan_names_the_lowest_rank_of_each_host_its_root():
    workers = {r: _node(f"10.0.0.{r // 3}", f"boot/{r // 3}") for r in range(6)}
    parts = hierarchy.plan(workers, {0: _node("10.0.0.9", "boot/9"), 1: _node("10.0.0.0", "boot/0")})
    assert {r: p["root"] for r, p in parts.items()} == {0: 0, 1: 0, 2: 0, 3: 3, 4: 3, 5: 3}
    assert parts[1]["remote_servers"] == [0]           # server 1 shares host 0: its pushes go as before
    assert parts[4]["remote_servers"] == [0, 1]
    assert parts[0]["token"] != parts[3]["token"] and parts[0]["token"] == parts[2]["token"]
    assert hierarchy.worker_name(3, hierarchy.roots_of(parts)) == "worker 3 (the local root of host 10.0.0.1)"
    assert hierarchy.worker_name(4, hierarchy.roots_of(parts)) == "worker 4"


def test_no_plan_for_lone_workers_or_a_server_on_every_host():
    lone = {0: _node("a", "A"), 1: _node("b", "B")}
    assert hierarchy.plan(lone, {0: _node("c", "C")}) == {}
    together = {0: _node("a", "A"), 1: _node("a", "A")}
    assert hierarchy.plan(together, {0: _node("a", "A")}) == {}


def test_one_node_that_cannot_take_part_turns_it_off_with_a_reason(caplog):
    workers = {0: _node("a", "A"), 1: _node("a", "A", "it runs the Python data path (RDMAKV_ENGINE=python, "
                                                      "RDMAKV_INTEGRITY or a trace)")}
    with caplog.at_level(logging.INFO, logger="rdmakv.hierarchy"):
        assert hierarchy.plan(workers, {0: _node("b", "B")}) == {}
    assert "one push per host is off: worker 1: it runs the Python data path" in caplog.text


def test_refusal_follows_the_settings(monkeypatch):
    from rdmakv.core.config import Config
    assert hierarchy.refusal(Config.load({}), True) is None
    assert hierarchy.refusal(Config.load({"RDMAKV_HIERARCHY": "0"}), True) == "RDMAKV_HIERARCHY=0"
    assert "asynchronous" in hierarchy.refusal(Config.load({}, mode="async"), True)
    assert "Python data path" in hierarchy.refusal(Config.load({}), False)
    monkeypatch.setenv("RDMAKV_SHM", "0")
    assert hierarchy.refusal(Config.load({}), True) == "RDMAKV_SHM=0 forbids shared memory"
