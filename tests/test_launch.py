"""The launcher runs a user's own script across real processes."""
import json
import os
import subprocess
import sys
import textwrap
import time

from cluster import REPO

USER_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import rdmakv

    with rdmakv.KVStore() as kv:
        n = kv.num_workers
        rng = np.random.default_rng(0)
        specs = [((), "int64"), ((0,), "float32"), ((5, 7), "float16"), ((300_001,), "int32"),
                 ((64, 3, 3, 3), "float64"), ((2, 1_000_000), "float32"), ((999,), "uint8")]
        handles = []
        for index, (shape, dtype) in enumerate(specs):
            base = rng.integers(0, 3, size=shape).astype(dtype)
            value = np.array(base * (kv.rank + 1))   # an array even when 0-d
            handles.append((base, kv.pushpull_async(f"t{index}", value, priority=int(rng.integers(-5, 5)))))
        for base, handle in handles:
            result = handle.wait()
            expected = (base * sum(range(1, n + 1))).astype(base.dtype)
            assert result.dtype == base.dtype and result.shape == base.shape
            np.testing.assert_array_equal(result, expected)
        try:
            kv.pushpull("t1", np.zeros((3,), np.float32))
        except ValueError as exc:
            print("clear error:", exc)
        print(f"OK rank {kv.rank} of {n}")
""")


def run_launch(tmp_path, script, *args, timeout=120):
    path = tmp_path / "script.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="30")
    return subprocess.run([sys.executable, "-m", "rdmakv.launch", *args, "--", sys.executable, str(path)],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_user_script_gets_exact_sums_on_3_workers_and_2_servers(tmp_path):
    done = run_launch(tmp_path, USER_SCRIPT, "-n", "3", "-s", "2")
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


def test_launch_requires_a_command():
    done = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-n", "1"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
    assert done.returncode == 2 and "worker command" in done.stderr
