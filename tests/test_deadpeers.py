"""kill -9 of a worker, a server or the scheduler in the middle of multi-chunk
pushpulls.  The surviving workers' pending and later calls raise an rdmakv
error naming the dead peer within RDMAKV_TIMEOUT (plus slack), every process
exits, the launcher stops the rest and exits non-zero, and no process is left
behind (each test tags its processes with a unique environment marker)."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np

import pytest

from cluster import REPO, tagged
from rdmakv.core.netif import free_port

TIMEOUT = 8
SLACK = 7
WORKER = os.path.join(REPO, "tests", "pp_worker.py")
NAMED = {"worker": re.compile(r"worker \d+"), "server": re.compile(r"server \d+"),
         "scheduler": re.compile(r"scheduler")}
# When the job fails (a worker or the scheduler died) the servers forward the reason and stop, but
# a worker may still see its server connection close before that notice: a named peer, though not
# the root cause.  Allowed here.
CONSEQUENCE = re.compile(r"server \d+ at ")


def role_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as environ:
        env = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
    return env.get(b"DMLC_ROLE", b"").decode(), env.get(b"DMLC_WORKER_ID", b"").decode()


class Output:
    def __init__(self, proc, label):
        self.lines = []
        threading.Thread(target=self._pump, args=(proc, label), daemon=True).start()

    def _pump(self, proc, label):
        for raw in iter(proc.stdout.readline, b""):
            self.lines.append(f"[{label}] " + raw.decode(errors="replace").rstrip())
        proc.stdout.close()


def job_env(marker, workers, servers):
    return dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1", RDKV_TEST_MARKER=marker,
                DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(free_port()),
                DMLC_NUM_WORKER=str(workers), DMLC_NUM_SERVER=str(servers), RDMAKV_TIMEOUT=str(TIMEOUT),
                RDMAKV_PARTITION_BYTES="32768", RDMAKV_TRANSPORT="tcp")


WORKER_ARGS = ["--rounds", "100000", "--elements", "300000", "--keys", "2"]


def wait_for_rounds(outputs, count, pattern="round 1 ok", timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(any(pattern in line for line in out.lines) for out in outputs) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the workers made no progress:\n" + "\n".join(l for o in outputs for l in o.lines[-10:]))


@pytest.fixture
def marker():
    tag = f"deadpeers-{uuid.uuid4().hex[:12]}"
    yield tag
    leftovers = tagged(tag)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"orphan processes {leftovers} outlived the test"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["worker", "server", "scheduler"])
def test_kill9_mid_pushpull_fails_survivors_clearly(tmp_path, marker, victim):
    env = job_env(marker, workers=3, servers=2)
    procs = {}
    outputs = []

    def start(label, argv, **extra):
        proc = subprocess.Popen(argv, env=dict(env, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs[label] = proc
        outputs.append(Output(proc, label))

    try:
        start("scheduler", [sys.executable, "-m", "rdmakv.server"], DMLC_ROLE="scheduler")
        for rank in range(2):
            start(f"server{rank}", [sys.executable, "-m", "rdmakv.server"], DMLC_ROLE="server")
        for rank in range(3):
            start(f"worker{rank}", [sys.executable, WORKER, *WORKER_ARGS, "--report", str(tmp_path)],
                  DMLC_ROLE="worker", DMLC_WORKER_ID=str(rank))
        wait_for_rounds(outputs, 3)
        target = {"worker": "worker2", "server": "server1", "scheduler": "scheduler"}[victim]
        killed_at = time.time()
        procs[target].kill()
        survivors = [f"worker{r}" for r in range(3) if f"worker{r}" != target]
        deadline = time.monotonic() + 2 * TIMEOUT + 2 * SLACK     # the pending call, then a later one
        codes = {}
        for label, proc in procs.items():
            try:
                codes[label] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[label] = "HUNG"
        log = "\n".join(line for out in outputs for line in out.lines[-12:])
        assert "HUNG" not in codes.values(), f"{codes}\n{log}"
        for label in survivors:
            assert codes[label] == 3, f"{label} exited {codes[label]}\n{log}"
            report = json.loads((tmp_path / f"worker-{label[-1]}.json").read_text())
            assert report["wrong"] is None and report["ok_rounds"] >= 2
            pending, later = report["errors"]
            for error in (pending, later):
                assert error["type"] is not None, f"{label}: a call after the death succeeded"
                assert NAMED[victim].search(error["message"]) or (
                    victim != "server" and CONSEQUENCE.search(error["message"])), (
                    f"{label}: {error['message']!r} names no {victim}")
            assert pending["t"] - killed_at <= TIMEOUT + SLACK, f"{label} took {pending['t'] - killed_at:.1f} s"
            assert later["took"] <= TIMEOUT + SLACK
            print(f"\nFIGURE kill -9 {victim}: {label} failed after {pending['t'] - killed_at:.2f} s "
                  f"({pending['type']}: {pending['message']}); later call failed in {later['took']:.2f} s")
        others = [label for label in procs if label not in survivors and label != target]
        assert all(codes[label] != 0 for label in others if victim != "worker" or label != "scheduler"), codes
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["worker", "server", "scheduler"])
def test_launcher_stops_the_rest(tmp_path, marker, victim):
    env = job_env(marker, workers=2, servers=2)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "rdmakv.launch", "-n", "2", "-s", "2", "--",
         sys.executable, WORKER, *WORKER_ARGS, "--report", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = Output(launcher, "launch")
    try:
        wait_for_rounds([output], 1, pattern="round 1 ok")
        roles = {pid: role_of(pid) for pid in tagged(marker) if pid != launcher.pid}
        chosen = [pid for pid, (role, _) in roles.items() if role == victim]
        assert chosen, f"no {victim} among {roles}"
        os.kill(chosen[0], signal.SIGKILL)
        began = time.monotonic()
        try:
            code = launcher.wait(TIMEOUT + SLACK + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the launcher did not stop the job:\n" + "\n".join(output.lines[-20:])) from None
        assert code != 0, "\n".join(output.lines[-20:])
        assert any("exited with status" in line for line in output.lines), output.lines[-10:]
        time.sleep(0.2)
        assert tagged(marker) == [], f"processes left by the launcher: {tagged(marker)}"
        print(f"\nFIGURE launcher, kill -9 {victim}: exited {code} after {time.monotonic() - began:.2f} s, "
              f"no orphans")
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()


def test_a_server_killed_as_the_job_ends_fails_it(cluster_factory):
    """Every worker said GOODBYE, but a server died before it answered SHUTDOWN:
    the job failed, whatever order the scheduler heard the two in."""
    cluster = cluster_factory(1, 1)
    (kv,) = cluster.connect()
    value = np.arange(1000, dtype=np.int64)
    kv.pushpull("k", value)
    assert (value == np.arange(1000)).all()
    scheduler, server = cluster.procs
    server.send_signal(signal.SIGSTOP)         # alive to the kernel, deaf to SHUTDOWN
    try:
        kv.close()                             # GOODBYE: the last worker's
        time.sleep(0.5)
    finally:
        server.kill()
    assert scheduler.wait(30) == 1, "\n".join(cluster.logs[0])
    assert any("server" in line and "disconnected unexpectedly" in line for line in cluster.logs[0]), cluster.logs[0]
