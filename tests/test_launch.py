"""The launcher runs a user's own script across real processes."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from cluster import REPO, tagged
from rdmakv.control.launch import parse_hosts
from rdmakv.core.netif import free_port

SUM_CHECK = os.path.join(REPO, "tests", "sum_check.py")


def run_launch(tmp_path, script, *args, timeout=120):
    path = tmp_path / "script.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="30")
    return subprocess.run([sys.executable, "-m", "rdmakv.launch", *args, "--", sys.executable, str(path)],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_user_script_gets_exact_sums_on_3_workers_and_2_servers(tmp_path):
    done = run_launch(tmp_path, open(SUM_CHECK).read(), "-n", "3", "-s", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    for rank in range(3):
        assert f"[worker {rank}] OK rank {rank} of 3" in done.stdout
        assert f"[worker {rank}] clear error: key 't1' was declared as float32[0]" in done.stdout


def test_a_failing_worker_stops_the_job_and_leaves_no_process(tmp_path):
    marker = f"rdmakv-orphan-check-{os.getpid()}-{time.time_ns()}"
    script = textwrap.dedent(f"""
        import sys, time
        import rdmakv
        kv = rdmakv.KVStore()
        if kv.rank == 1:
            sys.exit(3)
        time.sleep(600)  # {marker}
    """)
    started = time.monotonic()
    done = run_launch(tmp_path, script, "-n", "2", "-s", "1")
    assert done.returncode == 3, done.stdout
    assert "worker 1 exited with status 3" in done.stdout
    assert time.monotonic() - started < 60
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""


NO_CLOSE_SCRIPT = textwrap.dedent("""
    import numpy as np
    import rdmakv

    kv = rdmakv.KVStore()                  # never closed, as MXNet and BytePS scripts do
    a = np.arange(1000, dtype=np.int64)
    kv.pushpull("a", a)
    assert (a == np.arange(1000) * kv.num_workers).all()
    pending = kv.pushpull_async("b", np.full(1_000_000, kv.rank + 1, np.int32))   # never waited for
    if kv.rank == 1 and len(__import__("sys").argv) > 1:
        raise ZeroDivisionError("the user's own bug")
    print("OK rank", kv.rank)
""")


def test_a_script_that_never_closes_exits_0_and_writes_every_trace(tmp_path):
    traces = tmp_path / "traces"
    path = tmp_path / "script.py"
    path.write_text(NO_CLOSE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="30", RDMAKV_TRACE_DIR=str(traces))
    done = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-n", "2", "-s", "1", "--",
                           sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "disconnected unexpectedly" not in done.stdout
    assert sorted(os.listdir(traces)) == ["rdmakv-server-0.json", "rdmakv-worker-0.json", "rdmakv-worker-1.json"]
    # The pushpull nobody waited for still ran to the end on the server: its trace shows both pushes summed.
    server = json.loads((traces / "rdmakv-server-0.json").read_text())["traceEvents"]
    assert any(e["name"] == "summed" and e["args"]["key"] == "b" for e in server)


def test_an_unhandled_exception_still_fails_the_job_naming_it(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(NO_CLOSE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="30")
    done = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-n", "2", "-s", "1", "--",
                           sys.executable, str(path), "fail"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert ("job failed: worker 1 failed: exited with an unhandled ZeroDivisionError: the user's own bug"
            in done.stdout), done.stdout


def test_the_worker_whose_script_failed_is_blamed_not_the_one_it_took_down(tmp_path):
    # Worker 1 exits 3 mid-job; worker 0's next pushpull then fails (exit 1), often first.
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import rdmakv
        kv = rdmakv.KVStore()
        a = np.ones(10)
        kv.pushpull("a", a)
        if kv.rank == 1:
            sys.exit(3)
        kv.pushpull("a", a)
    """)
    for _ in range(3):
        done = run_launch(tmp_path, script, "-n", "2", "-s", "1")
        assert done.returncode == 3, done.stdout
        assert "[launch] worker 1 exited with status 3" in done.stdout


def test_the_scheduler_port_from_the_environment_is_used(tmp_path):
    from rdmakv.core.netif import free_port
    port = free_port()
    path = tmp_path / "script.py"
    path.write_text("import rdmakv\nprint('scheduler port', rdmakv.KVStore().config.scheduler_port)\n")
    done = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-n", "1", "-s", "1", "--", sys.executable,
                           str(path)], env=dict(os.environ, PYTHONPATH=REPO, DMLC_PS_ROOT_PORT=str(port)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"[worker 0] scheduler port {port}" in done.stdout


def test_launch_requires_a_command():
    done = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-n", "1"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
    assert done.returncode == 2 and "worker command" in done.stderr


SLEEPER = textwrap.dedent("""
    import subprocess, sys, time
    import rdmakv
    kv = rdmakv.KVStore()
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])   # like a data loader
    print("ready", flush=True)
    time.sleep(600)
""")


def wait_for_lines(proc, text, count, timeout=60):
    """Read proc's output until `count` lines contain text; return everything read."""
    lines = []
    deadline = time.monotonic() + timeout
    while sum(text in line for line in lines) < count:
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        lines.append(proc.stdout.readline())
    return "".join(lines)


def wait_until_gone(marker, timeout=20):
    deadline = time.monotonic() + timeout
    while tagged(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return tagged(marker)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP, signal.SIGINT])
def test_the_whole_job_ends_with_the_launcher(tmp_path, sig):
    """A closed terminal (SIGHUP), Ctrl-C or kill -9 of the launcher ends every process of
    the job, the workers' own children included."""
    marker = uuid.uuid4().hex
    path = tmp_path / "script.py"
    path.write_text(SLEEPER)
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="30", RDKV_TEST_MARKER=marker)
    launcher = subprocess.Popen([sys.executable, "-m", "rdmakv.launch", "-n", "2", "-s", "2", "--",
                                 sys.executable, str(path)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_lines(launcher, "] ready", 2)
        # the launcher, the scheduler, 2 servers, 2 workers and their 2 children (and a guard)
        assert len(tagged(marker)) >= 8
        launcher.send_signal(sig)
        launcher.wait(30)
        assert wait_until_gone(marker) == []
        if sig != signal.SIGKILL:
            assert launcher.returncode == 128 + sig
            assert f"{signal.Signals(sig).name}: stopping the job" in launcher.stdout.read()
    finally:
        for pid in tagged(marker):
            os.kill(pid, signal.SIGKILL)
        launcher.stdout.close()


def test_launcher_labels_are_the_servers_ranks(tmp_path):
    done = run_launch(tmp_path, "import rdmakv\nrdmakv.KVStore().close()\n", "-n", "1", "-s", "3")
    assert done.returncode == 0, done.stdout
    joined = [line for line in done.stdout.splitlines() if ": joined the job" in line]
    assert len(joined) == 3, done.stdout
    for line in joined:
        label = re.match(r"\[server (\d)\]", line).group(1)
        assert f"server {label}: joined" in line


def test_a_server_gets_the_rank_it_asks_for_whatever_its_arrival(tmp_path):
    """Server 1 registers first, server 0 later: each still gets its RDMAKV_SERVER_ID;
    a second server asking for a taken id is refused by name."""
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="30", DMLC_PS_ROOT_URI="127.0.0.1",
               DMLC_PS_ROOT_PORT=str(free_port()), DMLC_NUM_WORKER="1", DMLC_NUM_SERVER="2")
    server = [sys.executable, "-m", "rdmakv.server"]
    logs = {name: open(tmp_path / name, "w+") for name in ("scheduler", "a", "b", "second")}
    procs = {}

    def start(name, **variables):
        procs[name] = subprocess.Popen(server, env=dict(env, **variables), stdout=logs[name],
                                       stderr=subprocess.STDOUT)

    try:
        start("scheduler", DMLC_ROLE="scheduler")
        start("a", DMLC_ROLE="server", RDMAKV_SERVER_ID="1")
        start("b", DMLC_ROLE="server", RDMAKV_SERVER_ID="1")
        deadline = time.monotonic() + 30
        while procs["a"].poll() is None and procs["b"].poll() is None:
            assert time.monotonic() < deadline, "neither server asking for id 1 was refused"
            time.sleep(0.1)
        first, refused = ("b", "a") if procs["a"].poll() is not None else ("a", "b")
        assert procs[refused].returncode == 1
        assert "refused this server: server id 1 is already taken" in (tmp_path / refused).read_text()
        start("second", DMLC_ROLE="server", RDMAKV_SERVER_ID="0")
        worker = subprocess.run([sys.executable, "-c", "import rdmakv\nrdmakv.KVStore().close()\n"],
                                env=dict(env, DMLC_ROLE="worker"), capture_output=True, text=True, timeout=60)
        assert worker.returncode == 0, worker.stderr
        for name in ("scheduler", first, "second"):
            assert procs[name].wait(30) == 0
        assert "server 1: joined" in (tmp_path / first).read_text()
        assert "server 0: joined" in (tmp_path / "second").read_text()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        for log in logs.values():
            log.close()


def test_hosts_are_read_like_horovodrun_and_bad_ones_named():
    assert parse_hosts("h1:4, h2 ,[fd00::2]:2,[fd00::3]") == [("h1", 4), ("h2", 1), ("fd00::2", 2), ("fd00::3", 1)]
    for bad in ("h1:0", "h1:x", ":3", "", "[fd00::2]:"):
        with pytest.raises(ValueError, match="bad host|no host"):
            parse_hosts(bad)
    done = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-H", "h1:2", "-n", "3", "--", "true"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
    assert done.returncode == 2 and "-n 3 workers, but the hosts have 2 slots" in done.stderr
