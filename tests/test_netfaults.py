"""Network faults across hosts: the scheduler, two servers and two workers each
in their own network namespace ("host"), joined through a router namespace,
over IPv4 and IPv6.  Faults: delay with jitter, loss, duplication and
reordering (tc netem, or tests/impair.py where the kernel lacks netem), and
links that go down.  Every outcome is either exact sums or a clear error
within RDMAKV_TIMEOUT; nothing hangs, and no namespace is left behind."""
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import netns
from cluster import REPO

_unsupported = netns.probe()
pytestmark = pytest.mark.skipif(_unsupported is not None, reason=str(_unsupported))

HOSTS = ["sched", "srv0", "srv1", "wrk0", "wrk1"]
PORT = 9300
WORKER = os.path.join(REPO, "tests", "pp_worker.py")
NAMED_PEER = re.compile(r"server \d+ at |worker \d+|scheduler")


@pytest.fixture
def topology():
    netns.remove_stale()
    before = set(netns.ours())
    topo = netns.Topology(HOSTS)
    yield topo
    topo.close()
    assert set(netns.ours()) == before, "network namespaces left behind"


class Job:
    """A whole job spread over the hosts; output of each process goes to a file."""

    def __init__(self, topo, tmp_path, family, timeout=10, rounds=6, elements=100_000):
        self.topo = topo
        self.family = family
        self.report = tmp_path
        self.timeout = timeout
        scheduler = topo.hosts["sched"].address(family)
        self.base = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1",
                         DMLC_PS_ROOT_URI=scheduler, DMLC_PS_ROOT_PORT=str(PORT),
                         DMLC_NUM_WORKER="2", DMLC_NUM_SERVER="2", RDMAKV_TIMEOUT=str(timeout),
                         RDMAKV_PARTITION_BYTES="65536", RDMAKV_TRANSPORT="tcp")
        self.procs = {}
        self.lines = {}
        roles = [("sched", "scheduler"), ("srv0", "server"), ("srv1", "server")]
        for host, role in roles:
            env = dict(self.base, DMLC_ROLE=role, DMLC_NODE_HOST=topo.hosts[host].address(family))
            self._start(host, [sys.executable, "-m", "rdmakv.server"], env)
        for index, host in enumerate(["wrk0", "wrk1"]):
            env = dict(self.base, DMLC_ROLE="worker", DMLC_WORKER_ID=str(index))
            if family == 4 and index == 1:
                env["DMLC_INTERFACE"] = "eth0"       # the other way to pick the advertised address
            else:
                env["DMLC_NODE_HOST"] = topo.hosts[host].address(family)
            self._start(host, [sys.executable, WORKER, "--rounds", str(rounds), "--elements", str(elements),
                               "--report", str(tmp_path)], env)

    def _start(self, host, argv, env):
        proc = self.topo.spawn(host, argv, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.procs[host] = proc
        self.lines[host] = []
        threading.Thread(target=self._pump, args=(host, proc), daemon=True).start()

    def _pump(self, host, proc):
        for raw in iter(proc.stdout.readline, b""):
            self.lines[host].append(raw.decode(errors="replace").rstrip())
        proc.stdout.close()

    def wait_for_round(self, round_, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(any(line == f"round {round_} ok" for line in self.lines[h]) for h in ("wrk0", "wrk1")):
                return
            if any(p.poll() not in (None, 0) for p in self.procs.values()):
                break
            time.sleep(0.05)
        raise AssertionError(f"the workers did not reach round {round_}:\n{self.output()}")

    def finish(self, limit):
        """Exit codes once every process has exited; fails (after killing them) if any runs past `limit`."""
        deadline = time.monotonic() + limit
        codes = {}
        for host, proc in self.procs.items():
            try:
                codes[host] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[host] = None
        if None in codes.values():
            hung = [h for h, c in codes.items() if c is None]
            self.topo.close()
            raise AssertionError(f"{hung} still running {limit} s later: a hang\n{self.output()}")
        return codes

    def reports(self):
        result = {}
        for rank in range(2):
            path = self.report / f"worker-{rank}.json"
            result[rank] = json.loads(path.read_text()) if path.exists() else None
        return result

    def output(self):
        return "\n".join(f"[{host}] {line}" for host, lines in self.lines.items() for line in lines[-15:])


def check_exact_or_clear(job, codes, rounds, fault_time=None):
    """Every worker either matched numpy in every round, or failed with a clear error within the timeout."""
    outcome = {}
    for rank, report in job.reports().items():
        assert report is not None, f"worker {rank} wrote no report\n{job.output()}"
        assert report["wrong"] is None, f"worker {rank}: WRONG SUM {report['wrong']}"
        if report["errors"]:
            pending = report["errors"][0]
            message = pending["message"]
            assert NAMED_PEER.search(message), f"the error does not name the peer: {message}"
            if fault_time is not None:
                assert pending["t"] - fault_time <= job.timeout + 8, (
                    f"worker {rank} learned of the fault {pending['t'] - fault_time:.1f} s after it")
            later = report["errors"][1]
            assert later["type"] is not None, "a call after the failure succeeded"
            outcome[rank] = f"failed clearly: {message}"
        else:
            assert report["ok_rounds"] == rounds
            outcome[rank] = f"{rounds} rounds exact"
    workers = [codes["wrk0"], codes["wrk1"]]
    assert all(code in (0, 3) for code in workers), f"exit codes {codes}\n{job.output()}"
    return outcome


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", [4, 6])
def test_clean_network(topology, tmp_path, family):
    """The baseline: five hosts, separate addresses, exact sums."""
    assert topology.reachable("wrk0", "sched", family)
    job = Job(topology, tmp_path, family, rounds=4)
    codes = job.finish(90)
    assert codes == dict.fromkeys(HOSTS, 0), f"{codes}\n{job.output()}"
    assert [r["ok_rounds"] for r in job.reports().values()] == [4, 4]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("family", [4, 6])
def test_delay_loss_duplication_reordering(topology, tmp_path, family):
    """netem delay 20ms 5ms loss 1% duplicate 1% reorder 5% on every host's link, from the
    rendezvous on: TCP repairs it, the sums stay exact."""
    topology.impair(HOSTS, delay_ms=20, jitter_ms=5, loss=1, duplicate=1, reorder=5, seed=family)
    rounds = 6
    began = time.monotonic()
    job = Job(topology, tmp_path, family, rounds=rounds, elements=60_000)
    codes = job.finish(200)
    counts = topology.heal()
    outcome = check_exact_or_clear(job, codes, rounds)
    print(f"\nFIGURE netem IPv{family} ({'tc netem' if topology.netem else 'tests/impair.py'}): {counts}; "
          f"{outcome}; {time.monotonic() - began:.1f} s")
    assert all(code == 0 for code in codes.values()), f"{codes}: {outcome}\n{job.output()}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", [4, 6])
def test_brief_link_down(topology, tmp_path, family):
    """A server's link, then a worker's, goes down for 2 s mid-run: shorter than
    RDMAKV_TIMEOUT, so TCP retransmits and every sum stays exact."""
    rounds = 300          # a few seconds of rounds: 30 were sometimes all done before the faults
    job = Job(topology, tmp_path, family, rounds=rounds, elements=100_000)
    job.wait_for_round(1)
    topology.link_down("srv0", 2)
    time.sleep(0.5)
    topology.link_down("wrk1", 2)
    assert job.procs["wrk0"].poll() is None, "the run ended before the faults: make it longer"
    codes = job.finish(150)
    outcome = check_exact_or_clear(job, codes, rounds)
    print(f"\nFIGURE link down 2 s x2 IPv{family}: {outcome}")
    assert all(code == 0 for code in codes.values()), f"{codes}: {outcome}\n{job.output()}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", [4, 6])
def test_outage_longer_than_timeout_fails_clearly(topology, tmp_path, family):
    """A server's link stays down past RDMAKV_TIMEOUT: the workers' calls fail with an
    error naming what stopped answering, within the timeout, and every process exits."""
    timeout = 5
    job = Job(topology, tmp_path, family, timeout=timeout, rounds=10_000, elements=100_000)
    job.wait_for_round(1)
    fault = time.time()
    topology.set_link("srv0", up=False)
    try:
        deadline = time.monotonic() + timeout * 3 + 20
        for host in ("wrk0", "wrk1"):
            try:
                job.procs[host].wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{host} hung with a server unreachable\n{job.output()}") from None
    finally:
        topology.set_link("srv0", up=True)
    codes = job.finish(40)         # the rest notice once the link is back
    outcome = check_exact_or_clear(job, codes, None, fault_time=fault)
    print(f"\nFIGURE outage > timeout IPv{family}: codes {codes}; {outcome}")
    assert all(code == 3 for code in (codes["wrk0"], codes["wrk1"])), f"{codes}\n{job.output()}"
