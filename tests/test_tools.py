"""The benchmark tools run end to end in their quick mode and report what they
promise.  Timings are never asserted on: the machine is shared and noisy."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tool, *args, timeout=240):
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, tool), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{tool} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_resnet50_shapes_are_the_real_parameter_set():
    bench = _load("bench_kvstore")
    shapes = bench.resnet50_shapes()
    assert len(shapes) == 161
    assert sum(bench._count(s) for s in shapes) == 25_557_032
    assert shapes[0] == (64, 3, 7, 7) and shapes[-2:] == [(1000, 2048), (1000,)]


def test_expected_sums_are_exact_and_change_every_step():
    bench = _load("bench_kvstore")
    import numpy as np
    shapes = [(3, 5), (7,)]
    ranks = [bench.Tensors(shapes, r, 3) for r in range(3)]
    for step in (0, 1, 2):
        for t in ranks:
            t.fill(step)
        sums = [sum(t.values[i] for t in ranks) for i in range(len(shapes))]
        assert all(t.check(sums) for t in ranks)
        assert not ranks[0].check([s + 1 for s in sums])
    assert not np.array_equal(ranks[0].values[0], bench.Tensors(shapes, 1, 3).values[0] + 99)


def test_tcp_connections_between_workers_and_servers_are_counted_from_proc():
    """Real processes: a "server" accepting 3 connections from a "worker", and one more
    connection from the worker to a listener of this process, which is not counted."""
    import socket
    bench = _load("bench_kvstore")
    bystander = socket.create_server(("127.0.0.1", 0))
    code = ("import socket, sys, time\n"
            "s = socket.create_server(('127.0.0.1', 0)); print(s.getsockname()[1], flush=True)\n"
            "held = [s.accept()[0] for _ in range(3)]; print('ok', flush=True); sys.stdin.read()\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        port = int(server.stdout.readline())
        code = ("import socket, sys\n"
                f"held = [socket.create_connection(('127.0.0.1', {port})) for _ in range(3)]\n"
                f"held.append(socket.create_connection(('127.0.0.1', {bystander.getsockname()[1]})))\n"
                "print('ok', flush=True); sys.stdin.read()\n")
        worker = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        assert worker.stdout.readline().strip() == "ok" and server.stdout.readline().strip() == "ok"
        assert bench.count_tcp_connections([worker.pid], [server.pid]) == 3
        assert bench.count_tcp_connections([server.pid], [worker.pid]) == 3
        assert bench.count_tcp_connections([worker.pid], [os.getpid()]) == 0     # the bystander is not accepted
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.stdin.close()
                proc.wait(10)
        bystander.close()


def _plot_args(path):
    """--plot where matplotlib is installed (ci/setup.sh installs it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    return ["--plot", str(path)]


def test_bench_calls_alternates_two_trees_and_checks_the_sums(tmp_path):
    out = tmp_path / "calls.json"
    proc = _run("bench_calls.py", "--keys", "16", "--steps", "3", "--repeats", "1", "--against", REPO,
                "--json", str(out))
    assert "after / before: call" in proc.stdout
    report = json.loads(out.read_text())
    assert report["keys"] == 16 and set(report["runs"]) == {"before", "after"}
    assert all(len(runs) == 1 and len(runs[0]) == 3 for runs in report["runs"].values())


def test_bench_kvstore_quick(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = _run("bench_kvstore.py", "--quick", "--systems", "rdmakv,gloo", "--workloads", "4KiB,256KiB",
                "--torch-python", str(tmp_path / "no-such-python"), "--json", str(out), *_plot_args(png))
    report = json.loads(out.read_text())
    assert report["exact"] is True
    assert set(report) >= {"config", "limits", "workloads", "skipped", "exact"}
    assert report["limits"]["memcpy"]["bytes_per_s"] > 0
    assert report["limits"]["iperf3"]["status"] in ("ok", "skipped", "failed")
    # the second floor: as many parallel streams as rdmakv's data connections (2 workers x 1 server)
    assert report["config"]["iperf_streams"] == 2
    assert report["limits"]["iperf3_parallel"]["status"] in ("ok", "skipped", "failed")
    # a baseline that cannot run is reported with its reason, never dropped
    assert "not found" in report["skipped"]["gloo"]
    for name in ("4KiB", "256KiB"):
        entry = report["workloads"][name]
        assert entry["tensors"] == 1 and entry["bytes"] in (4096, 262144)
        ours = entry["systems"]["rdmakv"]
        assert ours["status"] == "ok" and ours["exact"] is True, ours
        assert set(ours) >= {"step_ms_median", "bytes_per_worker_per_s", "cpu_s_per_step",
                             "peak_rss_bytes_by_role", "steps"}
        assert set(ours["peak_rss_bytes_by_role"]) == {"worker", "server", "scheduler"}
        assert entry["systems"]["gloo"]["status"] == "skipped"
        assert "memcpy_floor" in entry["rdmakv_ratio"]
        assert "worker_server_tcp_connections" in ours
    assert "4KiB" in proc.stdout and "rdmakv ms" in proc.stdout and "skipped" in proc.stdout
    assert png.exists() or not _plot_args(png)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_kvstore_quick_with_baselines(tmp_path):
    pytest.importorskip("mxnet")
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    _run("bench_kvstore.py", "--quick", "--workloads", "4KiB", "--json", str(out), timeout=560)
    report = json.loads(out.read_text())
    systems = report["workloads"]["4KiB"]["systems"]
    for name in ("rdmakv", "mxnet", "gloo"):
        assert systems[name]["status"] == "ok" and systems[name]["exact"] is True, systems[name]
    assert set(report["workloads"]["4KiB"]["rdmakv_ratio"]) >= {"mxnet", "gloo"}


def test_bench_transport_quick(tmp_path):
    out, png = tmp_path / "transport.json", tmp_path / "transport.png"
    proc = _run("bench_transport.py", "--quick", "--json", str(out), *_plot_args(png), timeout=120)
    report = json.loads(out.read_text())
    assert report["transport"] == "tcp"
    assert [r["bytes"] for r in report["results"]] == [8, 4096, 65536, 1 << 20]
    for r in report["results"]:
        assert set(r) >= {"gb_per_s", "gbit_per_s", "msg_per_s", "lat_us_p50", "lat_us_p99"}
        assert r["lat_us_p99"] >= r["lat_us_p50"] > 0
        assert r["gbit_per_s"] == pytest.approx(r["gb_per_s"] * 8)
    assert "lat p50 us" in proc.stdout
    assert "[bench_transport]" in proc.stderr       # progress while running
    assert png.exists() or not _plot_args(png)


def test_bench_overlap_quick(tmp_path):
    out = tmp_path / "overlap.json"
    systems = "rdmakv,rdmakv-python" + (",mxnet" if importlib.util.find_spec("mxnet") else "")
    proc = _run("bench_overlap.py", "--quick", "--systems", systems, "--json", str(out), timeout=180)
    report = json.loads(out.read_text())
    assert list(report["workloads"]) == ["16x4MiB", "256x4KiB"]
    for results in report["workloads"].values():
        assert list(results) == systems.split(",")
        for r in results.values():
            assert r["status"] == "ok" and r["exact"], r
            assert all(len(r["times"][kind]) == 3 for kind in ("transfer", "compute", "both"))
            assert r["overlap"] > 0
    assert "overlap = both / max(transfer, compute)" in proc.stdout


def test_bench_async_quick(tmp_path):
    out = tmp_path / "async.json"
    proc = _run("bench_async.py", "--quick", "--json", str(out), timeout=180)
    report = json.loads(out.read_text())
    assert list(report["modes"]) == ["sync", "async"]
    for r in report["modes"].values():
        assert r["status"] == "ok" and r["exact"], r
        assert sorted(r["steps_per_s"]) == ["0", "1"] and r["fast_steps_per_s"] > 0
    assert "fast workers, async / sync:" in proc.stdout


def test_bench_transport_unknown_transport_is_an_error():
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_transport.py"), "--transport", "carrier-pigeon"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unknown transport" in proc.stderr


def test_trace_stages_follows_each_chunk_through_the_cluster(tmp_path):
    trace_dir = tmp_path / "trace"
    env = {name: value for name, value in os.environ.items() if name not in ("RDMAKV_SHM", "RDMAKV_TRANSPORT")}
    job = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-n", "2", "-s", "1", "--", sys.executable,
                          os.path.join(TOOLS, "pushpull_time.py"), "--mib", "0.25", "--steps", "12"],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=dict(env, PYTHONPATH=REPO, RDMAKV_TRACE_DIR=str(trace_dir)))
    assert job.returncode == 0, job.stdout[-2000:]
    assert "PUSHPULL transport=shm+tcp rank=0" in job.stdout
    proc = _run("trace_stages.py", str(trace_dir), "--skip-rounds", "2")
    for worker in ("0", "1"):
        block = proc.stdout.split(f"worker {worker}: median us after queued\n")[1].splitlines()[:4]
        medians = {line.split()[0]: float(line.split()[1]) for line in block}
        assert list(medians) == ["sent", "push", "summed", "received"]
        # Causal order: the round is summed after this worker's push is in, and received after that.
        assert 0 < medians["push"] <= medians["summed"] <= medians["received"]
        assert all("(11 chunks)" in line for line in block)   # rounds 2..12 of the one key


def test_trace_stages_without_traces_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "trace_stages.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no rdmakv traces" in proc.stderr


def test_bench_compression_quick(tmp_path):
    """Two workers and a server on network namespaces over links shaped to 1 Gbit/s:
    every compression trains the model, and the bytes the server's veth pair counts
    shrink by what each codec promises."""
    import netns
    missing = netns.probe()
    if missing:
        pytest.skip(missing)
    out = tmp_path / "compression.json"
    proc = _run("bench_compression.py", "--quick", "--json", str(out))
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == list(_load("bench_compression").CONFIGS)
    for name, result in results.items():
        assert result["step_s"] > 0 and 0 <= result["accuracy"] <= 1, (name, result)
        assert 0 < result["loss"] < 10, (name, result)
    wire = {name: result["wire_bytes_per_step"] for name, result in results.items()}
    assert wire["fp16"] < 0.7 * wire["none"] and wire["2bit"] < 0.7 * wire["none"]
    for name in ("onebit+ef", "topk+ef", "randomk+ef", "dithering"):
        assert wire[name] < 0.35 * wire["none"], wire
    # the same data from the same weights: fp16 trains as no compression does, to its rounding
    assert abs(results["fp16"]["loss"] - results["none"]["loss"]) < 0.05
    assert "x none" in proc.stdout and "onebit+ef" in proc.stdout
