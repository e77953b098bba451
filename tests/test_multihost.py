"""Jobs across hosts, for real: two network namespaces joined by veth links stand for
two machines, each running an OpenSSH server with a throwaway key.  rdmakv.launch -H
and mpirun start the job from the first host over ssh; the data crosses the links."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import netns
import sshd
from cluster import REPO, tagged

SUM_CHECK = os.path.join(REPO, "tests", "sum_check.py")
RDMAKV_RUN = os.path.join(os.path.dirname(sys.executable), "rdmakv-run")

_missing = netns.probe() or sshd.probe()
pytestmark = pytest.mark.skipif(_missing is not None, reason=str(_missing))


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    netns.remove_stale()
    topology = netns.Topology(["h1", "h2"])
    try:
        ssh = sshd.SshHosts(topology, tmp_path_factory.mktemp("ssh"))
        yield topology, ssh
    finally:
        topology.close()


def run_on(topology, host, argv, marker, **popen):
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="30", RDKV_TEST_MARKER=marker)
    return subprocess.Popen(["ip", "netns", "exec", topology.hosts[host].namespace, *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **popen)


def launch(hosts, marker, *args):
    topology, ssh = hosts
    h1, h2 = topology.hosts["h1"].ipv4, topology.hosts["h2"].ipv4
    argv = [sys.executable, "-m", "rdmakv.launch", "-H", f"{h1}:1,{h2}:2", "--ssh", " ".join(ssh.ssh),
            "-x", "RDKV_TEST_MARKER", *args]
    return run_on(topology, "h1", argv, marker), h1, h2


def wait_until_gone(marker, timeout=20):
    deadline = time.monotonic() + timeout
    while tagged(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return tagged(marker)


def test_a_job_over_ssh_on_two_hosts(hosts):
    marker = uuid.uuid4().hex
    proc, h1, h2 = launch(hosts, marker, "--", sys.executable, SUM_CHECK)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    # the first host's slot, then the second's two; one server per host; the scheduler on the first
    for rank, host in enumerate([h1, h2, h2]):
        assert f"[{host} worker {rank}] OK rank {rank} of 3" in out
    assert f"[{h1} server 0] " in out and f"[{h2} server 1] " in out and f"[{h1} scheduler] " in out
    assert f"server listening on {h2}:" in out          # the servers listen on the veth links
    assert wait_until_gone(marker, 5) == []


def test_a_failing_remote_worker_stops_the_job_on_every_host(hosts, tmp_path):
    marker = uuid.uuid4().hex
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import rdmakv
        kv = rdmakv.KVStore()
        if kv.rank == 2:
            sys.exit(3)
        time.sleep(600)
    """))
    proc, _, h2 = launch(hosts, marker, "--", sys.executable, str(script))
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, out
    assert f"[launch] {h2} worker 2 exited with status 3; stopping the job" in out
    assert wait_until_gone(marker) == []


def test_killing_the_launcher_ends_the_remote_processes(hosts, tmp_path):
    marker = uuid.uuid4().hex
    script = tmp_path / "sleep.py"
    script.write_text("import time\nimport rdmakv\nkv = rdmakv.KVStore()\nprint('ready', flush=True)\n"
                      "time.sleep(600)\n")
    proc, _, _ = launch(hosts, marker, "--", sys.executable, str(script))
    try:
        lines = []
        while sum("] ready" in line for line in lines) < 3:
            assert proc.poll() is None, "".join(lines)
            lines.append(proc.stdout.readline())
        # launcher, guard, 5 ssh clients, 5 lifelines and their 5 processes
        assert len(tagged(marker)) >= 11
        proc.kill()
        proc.wait()
        assert wait_until_gone(marker) == []
    finally:
        for pid in tagged(marker):
            os.kill(pid, signal.SIGKILL)
        proc.stdout.close()


def test_an_unreachable_host_fails_the_job_at_once(hosts):
    topology, ssh = hosts
    argv = [sys.executable, "-m", "rdmakv.launch", "-H", f"{topology.hosts['h1'].ipv4}:1,198.18.99.2:1",
            "--ssh", " ".join(ssh.ssh), "--", sys.executable, SUM_CHECK]
    proc = run_on(topology, "h1", argv, uuid.uuid4().hex)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 255, out
    assert "198.18.99.2 worker 1 exited with status 255 (ssh could not reach the host or run the command there)" \
        in out or "198.18.99.2 server 1 exited with status 255 (ssh could not reach" in out


def test_mpirun_across_two_hosts(hosts):
    topology, ssh = hosts
    h1, h2 = topology.hosts["h1"].ipv4, topology.hosts["h2"].ipv4
    argv = ["mpirun", "--allow-run-as-root", "-H", f"{h1}:3,{h2}:3", "-np", "6",
            "--mca", "plm_rsh_agent", " ".join(ssh.ssh), "--mca", "oob_tcp_if_include", "eth0",
            "-x", "PYTHONPATH", "-x", "RDMAKV_TIMEOUT", "-x", "RDKV_TEST_MARKER", "-x", "PATH",
            RDMAKV_RUN, "-s", "2", sys.executable, SUM_CHECK]
    marker = uuid.uuid4().hex
    proc = run_on(topology, "h1", argv, marker)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert sorted(line for line in out.splitlines() if line.startswith("OK")) == [
        "OK rank 0 of 3", "OK rank 1 of 3", "OK rank 2 of 3"]
    assert f"rdmakv-run: Open MPI rank 5 of 6 is worker 2 (scheduler at {h1}:" in out
    assert wait_until_gone(marker, 5) == []
