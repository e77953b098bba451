"""The timeline: BytePS's switches, the step window, duration events, streaming."""
import importlib.util
import json
import os

import numpy as np

from cluster import REPO
from rdmakv.control import trace
from rdmakv.core.config import Config


def _trace_stages():
    spec = importlib.util.spec_from_file_location("trace_stages", os.path.join(REPO, "tools", "trace_stages.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_byteps_trace_on_traces_into_its_default_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracer = trace.make(Config.load({"BYTEPS_TRACE_ON": "1"}), "worker", 3)
    tracer.write()
    assert tracer.path == os.path.join("traces", "rdmakv-worker-3.json")
    assert json.load(open(tmp_path / tracer.path))["traceEvents"][0]["ph"] == "M"


def test_byteps_trace_on_0_turns_a_trace_dir_off(tmp_path):
    assert trace.make(Config.load({"BYTEPS_TRACE_ON": "0", "BYTEPS_TRACE_DIR": str(tmp_path)}), "worker", 0) is None
    assert trace.make(Config.load({}), "worker", 0) is None
    assert trace.make(Config.load({"BYTEPS_TRACE_DIR": str(tmp_path)}), "worker", 0) is not None


def test_events_reach_the_disk_before_close_and_a_cut_file_still_reads(tmp_path):
    tracer = trace.Tracer(str(tmp_path), "worker", 0)
    for rnd in range(2000):
        for stage in ("queued", "sent", "received"):
            tracer.stage(stage, key="k", chunk=0, round=rnd)
    # Nothing is held until close: most of the 2000 rounds are in the file already.
    before_close = _trace_stages().read_events(tracer.path)
    assert sum(e["name"] == "received" for e in before_close) > 1500
    assert not tracer._marks                    # no span left open once its chunk is received
    tracer.write()
    tracer.write()
    events = json.load(open(tracer.path))["traceEvents"]
    assert sum(e["name"] == "received" for e in events) == 2000
    # The duration of each stage, as a matched begin/end pair per chunk.
    spans = [e for e in events if e["ph"] in "be"]
    assert {e["name"] for e in spans} == {"send queue", "push, sum and result"}
    begins = {(e["name"], e["id"]): e["ts"] for e in spans if e["ph"] == "b"}
    ends = {(e["name"], e["id"]): e["ts"] for e in spans if e["ph"] == "e"}
    assert begins.keys() == ends.keys() and len(begins) == 4000
    assert all(ends[span] >= begins[span] for span in begins)
    tracer.stage("queued", key="k", chunk=0, round=2000)        # after close: ignored, file intact
    assert len(json.load(open(tracer.path))["traceEvents"]) == len(events)


def test_only_the_step_window_is_traced_on_workers_and_servers(cluster_factory, tmp_path, monkeypatch):
    window = {"BYTEPS_TRACE_DIR": str(tmp_path), "BYTEPS_TRACE_START_STEP": "2", "BYTEPS_TRACE_END_STEP": "3"}
    for name, value in window.items():       # the workers are KVStores in this process
        monkeypatch.setenv(name, value)
    cluster = cluster_factory(2, 2, RDMAKV_PARTITION_BYTES=4096, **window)

    def train(kv):
        kv.declare("first", (10,), np.float32)      # the first key declared numbers the steps
        for step in range(6):
            kv.pushpull("grad", np.ones(3000, np.float32))  # 3 chunks over both servers
            kv.pushpull("first", np.ones(10, np.float32))
        return True

    assert cluster.run(train) == [True, True]
    cluster.close()
    assert cluster.wait() == [0, 0, 0]
    for name in ("rdmakv-worker-0.json", "rdmakv-worker-1.json", "rdmakv-server-0.json", "rdmakv-server-1.json"):
        events = json.load(open(tmp_path / name))["traceEvents"]
        rounds = {(e["args"]["key"], e["args"]["round"]) for e in events if e["ph"] == "i"}
        if name.startswith("rdmakv-worker"):
            # Step n starts with round n of "first", after round n of "grad": grad's round n+1 is in step n.
            assert rounds == {("first", 2), ("first", 3), ("grad", 3), ("grad", 4)}, name
        else:
            assert rounds and {rnd for _, rnd in rounds} <= {2, 3, 4}, (name, rounds)
