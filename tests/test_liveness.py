"""Silent peers and blame (issue 11, items 7 and 10): a scheduler or worker
stopped with a real SIGSTOP (its kernel still answers TCP keepalive), a worker
that never pushes a key, and hostile text in a relayed ERROR.  Every role must
give up within RDMAKV_TIMEOUT (plus slack) with an error that names the
culprit, never a survivor."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import rdmakv
from cluster import REPO
from rdmakv.core.protocol import Op

TIMEOUT = 5           # short, but with room for heartbeats on a loaded 2-core machine
SLACK = 20           # generous: the machine is shared; we check that things end, not how fast
WORKER = os.path.join(REPO, "tests", "pp_worker.py")


def unprintable(text):
    return [c for c in text if not c.isprintable()]


@pytest.fixture
def stopped():
    """Processes the test stopped: killed at the end whatever happens (a stopped
    process ignores everything but SIGKILL and SIGCONT)."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def wait_until(predicate, what, limit=TIMEOUT + SLACK):
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {limit} s")
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_stopped_scheduler_ends_the_servers(cluster_factory, stopped):
    """The workers finish while the scheduler is stopped; the servers, which wait for its
    SHUTDOWN, must notice its silence and exit naming it (before: they waited forever)."""
    cluster = cluster_factory(num_workers=2, num_servers=2, RDMAKV_TIMEOUT=TIMEOUT, RDMAKV_TRANSPORT="tcp")
    cluster.connect()
    sums = cluster.run(lambda kv: kv.pushpull("x", np.full(50_000, kv.rank + 1, np.int32)).copy())
    assert all(np.array_equal(s, np.full(50_000, 3, np.int32)) for s in sums)
    scheduler, servers = cluster.procs[0], cluster.procs[1:]
    stopped.append(scheduler)
    os.kill(scheduler.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    for kv in cluster.stores:
        kv.close(timeout=5)             # GOODBYE lands in the stopped scheduler's socket buffer
    cluster.stores = []
    codes = []
    for proc in servers:
        try:
            codes.append(proc.wait(TIMEOUT + SLACK))
        except subprocess.TimeoutExpired:
            codes.append("still running")
    logs = "\n".join(line for tail in cluster.logs[1:] for line in tail)
    assert codes == [1, 1], f"servers: {codes}\n{logs}"
    took = time.monotonic() - stopped_at
    for tail in cluster.logs[1:]:
        assert any("lost the scheduler" in line and f"scheduler at 127.0.0.1:{cluster.port} sent nothing"
                   in line for line in tail), "\n".join(tail)
    verdict = next(line for line in cluster.logs[1] if "lost the scheduler" in line)
    print(f"\nFIGURE stopped scheduler: both servers exited 1 within {took:.1f} s of SIGSTOP: {verdict}")


@pytest.mark.timeout(90)
def test_stopped_scheduler_fails_the_workers(cluster_factory, stopped):
    """A worker whose scheduler stops fails its next call naming the scheduler, within the timeout."""
    cluster = cluster_factory(num_workers=1, num_servers=1, RDMAKV_TIMEOUT=TIMEOUT, RDMAKV_TRANSPORT="tcp")
    (kv,) = cluster.connect()
    value = np.arange(1000, dtype=np.int64)
    assert np.array_equal(kv.pushpull("x", value.copy()), value)
    stopped.append(cluster.procs[0])
    os.kill(cluster.procs[0].pid, signal.SIGSTOP)
    began = time.monotonic()
    error = None
    while error is None and time.monotonic() - began < TIMEOUT + SLACK:
        try:
            kv.pushpull("x", value.copy())      # the servers still answer: only the scheduler is silent
            time.sleep(0.1)
        except rdmakv.RdmaKVError as exc:
            error = exc
    assert error is not None, "the worker never noticed that the scheduler stopped"
    assert f"the scheduler at 127.0.0.1:{cluster.port} sent nothing for" in str(error), error
    print(f"\nFIGURE stopped scheduler: the worker's call failed {time.monotonic() - began:.1f} s after "
          f"SIGSTOP: {error}")
    with pytest.raises(rdmakv.RdmaKVError, match="scheduler"):
        kv.barrier()


def start_job(tmp_path, cluster, workers):
    """pp_worker processes against the cluster's scheduler and servers; their stdout lines."""
    env = dict(cluster.env, DMLC_ROLE="worker", PYTHONUNBUFFERED="1")
    procs, lines = [], []
    for rank in range(workers):
        proc = subprocess.Popen(
            [sys.executable, WORKER, "--rounds", "100000", "--elements", "20000", "--keys", "2",
             "--report", str(tmp_path)], env=dict(env, DMLC_WORKER_ID=str(rank)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = []
        threading.Thread(target=lambda p=proc, o=out: o.extend(
            l.decode(errors="replace").rstrip() for l in iter(p.stdout.readline, b"")), daemon=True).start()
        procs.append(proc)
        lines.append(out)
    return procs, lines


@pytest.mark.timeout(120)
def test_stopped_worker_is_named(tmp_path, cluster_factory, stopped):
    """Worker 1 is stopped mid-job: worker 0's pending call, and the scheduler, must name
    worker 1 (before: worker 0 saw only the servers, and the scheduler blamed worker 0)."""
    cluster = cluster_factory(num_workers=2, num_servers=2, RDMAKV_TIMEOUT=TIMEOUT, RDMAKV_TRANSPORT="tcp",
                              RDMAKV_PARTITION_BYTES=16384)
    procs, lines = start_job(tmp_path, cluster, 2)
    stopped.extend(procs)
    wait_until(lambda: all(any("round 1 ok" in l for l in out) for out in lines), "two rounds")
    os.kill(procs[1].pid, signal.SIGSTOP)
    try:
        code = procs[0].wait(2 * TIMEOUT + SLACK)
    except subprocess.TimeoutExpired:
        code = "still running"
    assert code == 3, f"worker 0: {code}\n" + "\n".join(lines[0][-10:])
    report = json.loads((tmp_path / "worker-0.json").read_text())
    pending = report["errors"][0]["message"]
    assert "worker 1" in pending, pending
    scheduler_log = "\n".join(cluster.logs[0])
    wait_until(lambda: any("job failed" in line for line in cluster.logs[0]), "the scheduler's verdict")
    verdict = next(line for line in cluster.logs[0] if "job failed" in line)
    assert "worker 1" in verdict and "worker 0 disconnected" not in verdict, scheduler_log
    print(f"\nFIGURE stopped worker 1: worker 0 got {pending!r}; scheduler: {verdict}")


@pytest.mark.timeout(90)
def test_worker_that_never_pushes_is_named(cluster_factory):
    """Worker 1 stays alive but never pushes key x: worker 0's timeout names worker 1, and
    once worker 0 leaves, the scheduler's verdict carries that reason instead of blaming it."""
    cluster = cluster_factory(num_workers=2, num_servers=2, RDMAKV_TIMEOUT=TIMEOUT, RDMAKV_TRANSPORT="tcp",
                              RDMAKV_PARTITION_BYTES=16384)
    stores = cluster.connect()
    left = threading.Event()

    def work(kv):
        if kv.rank == 1:
            left.wait(TIMEOUT + SLACK)      # alive, heartbeating, but no push of x
            return None
        try:
            kv.pushpull("x", np.ones(20_000, np.float32))
        finally:
            left.set()

    results, errors = cluster.run_collect(work)
    error = errors[stores.index(next(kv for kv in stores if kv.rank == 0))]
    assert isinstance(error, rdmakv.PeerTimeout), error
    assert "has not received the push of worker 1" in str(error), error
    assert "worker 0" not in str(error), error
    survivor = next(kv for kv in stores if kv.rank == 0)
    survivor.close(timeout=5)              # leaves at once: its round was already given up
    wait_until(lambda: any("job failed" in line for line in cluster.logs[0]), "the scheduler's verdict")
    verdict = next(line for line in cluster.logs[0] if "job failed" in line)
    assert "worker 0 failed: pushpull of key 'x'" in verdict and "push of worker 1" in verdict, verdict
    print(f"\nFIGURE never-pushing worker: {error}\nFIGURE scheduler: {verdict}")


@pytest.mark.timeout(90)
def test_relayed_error_text_is_sanitized(cluster_factory):
    """A worker leaves with an ERROR full of terminal escapes, newlines and a bidi
    override, 200,000 characters long: what the others (and the logs) repeat of it is
    printable and bounded."""
    cluster = cluster_factory(num_workers=2, num_servers=1, RDMAKV_TIMEOUT=TIMEOUT, RDMAKV_TRANSPORT="tcp")
    stores = cluster.connect()
    hostile = next(kv for kv in stores if kv.rank == 1)
    survivor = next(kv for kv in stores if kv.rank == 0)
    evil = "\x1b[2J\x1b[31mFAKE: worker 0 is to blame\r\n\u202egnp.exe\x00" + "A" * 200_000
    handle = survivor.pushpull_async("x", np.ones(1000, np.int32))
    hostile._links[0].send_json(Op.ERROR, {"message": evil})
    hostile._control.send(Op.ERROR, {"message": evil})
    hostile._teardown()
    with pytest.raises(rdmakv.RdmaKVError) as caught:
        handle.wait()
    text = str(caught.value)
    assert "worker 1" in text and "FAKE" in text, text
    assert not unprintable(text), repr(text[:300])
    assert len(text) < 2500, len(text)
    print(f"\nFIGURE hostile ERROR text as relayed ({len(text)} characters): {text[:160]}...")
    with pytest.raises(rdmakv.RdmaKVError) as later:
        survivor.pushpull("x", np.ones(1000, np.int32))
    assert not unprintable(str(later.value)) and len(str(later.value)) < 2500
    wait_until(lambda: any("job failed" in line for line in cluster.logs[0]), "the scheduler's verdict")
    for tail in cluster.logs:
        for line in tail:
            assert not unprintable(line) and len(line) < 3000, repr(line[:300])
