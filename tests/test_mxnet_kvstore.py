"""rdmakv.mxnet: the MXNet KVStore, on real local clusters started by rdmakv.launch."""
import os
import subprocess
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")
import rdmakv.mxnet as rmx  # noqa: E402

pytestmark = pytest.mark.mxnet
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "mxnet_worker.py")
USER_SCRIPT = os.path.join(REPO, "tests", "mxnet_user_script.py")


def launch(scenario, outdir, workers=2, servers=1, timeout=240, stdout=None, **settings):
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="60", **settings)
    proc = subprocess.run(
        [sys.executable, "-m", "rdmakv.launch", "-n", str(workers), "-s", str(servers), "--",
         sys.executable, WORKER, scenario, str(outdir)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    for rank in range(workers):
        assert "worker %d: %s ok" % (rank, scenario) in proc.stdout
    if stdout is not None:
        stdout.append(proc.stdout)
    return [dict(np.load(os.path.join(outdir, "%s-%d.npz" % (scenario, r))))
            for r in range(workers)]


def assert_same_on_every_worker(results):
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for name in results[0]:
            np.testing.assert_array_equal(other[name], results[0][name], err_msg=name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2])
def test_api_examples(tmp_path, workers):
    stdout = []
    assert_same_on_every_worker(launch("api", tmp_path, workers=workers, stdout=stdout))
    # What the API text's examples print: broadcast gives rank 0's 2s; pushpull
    # gives 8s with one worker and their sum, 8 * N, with N.
    for rank in range(workers):
        lines = [line.split("] ", 1)[1] for line in stdout[0].splitlines()
                 if line.startswith("[worker %d] " % rank)]
        start = lines.index("api example broadcast:")
        assert lines[start + 1:start + 6] == (
            str(np.full((2, 3), 2, np.float32)).splitlines() + ["api example pushpull:"]
            + str(np.full((2, 3), 8 * workers, np.float32)).splitlines()), lines


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", ["trainer-local", "trainer-kvstore"])
def test_gluon_trainer_two_workers_match_one_process_on_the_union(tmp_path, scenario):
    # Each worker also checks its weights against one process training on
    # both shards (tests/mxnet_worker.py); here: every worker ends identical.
    assert_same_on_every_worker(launch(scenario, tmp_path))


@pytest.mark.timeout(300)
def test_on_the_native_engine_mxnet_operators_complete_while_python_holds_the_gil(tmp_path):
    # Worker 0 holds the GIL in a busy loop while its pushpull's result arrives: the
    # engine thread completes MXNet's operator without Python (tests/mxnet_worker.py).
    results = launch("gil-held", tmp_path, RDMAKV_TRANSPORT="tcp")
    for result in results:
        np.testing.assert_array_equal(result["result"], np.full(4096, 3.0))


@pytest.mark.timeout(300)
def test_async_store_applies_every_push_through_the_server_optimizer(tmp_path):
    results = launch("async", tmp_path, servers=2, RDMAKV_MODE="async")
    assert_same_on_every_worker(results)


@pytest.mark.timeout(300)
def test_gluon_trainer_on_the_async_store_converges(tmp_path):
    # tests/mxnet_worker.py checks the loss against its bound on each worker.
    for result in launch("async-trainer", tmp_path, RDMAKV_MODE="async"):
        assert result["last"] < 0.01


@pytest.mark.timeout(300)
def test_trainer_save_and_load_states_resume_bit_identically(tmp_path):
    assert_same_on_every_worker(launch("states", tmp_path, servers=2))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("api,name", [("trainer", "rdmakv"), ("trainer", "dist_sync_rdmakv"),
                                      ("module", "rdmakv"), ("module", "dist_sync_rdmakv")])
def test_script_naming_the_store_trains_distributed_and_exits_0_without_close(tmp_path, api, name):
    # MXNet itself creates no store for a name without "dist" on one device: the
    # workers would each train alone, silently.  The script also creates the store
    # three times and never closes it.
    traces = tmp_path / "traces"
    env = dict(os.environ, PYTHONPATH=REPO, RDMAKV_TIMEOUT="60", RDMAKV_TRACE_DIR=str(traces))
    proc = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-n", "2", "-s", "1", "--",
                           sys.executable, USER_SCRIPT, api, name, str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "disconnected unexpectedly" not in proc.stdout
    assert sorted(os.listdir(traces)) == ["rdmakv-server-0.json", "rdmakv-worker-0.json",
                                          "rdmakv-worker-1.json"]
    results = [dict(np.load(os.path.join(tmp_path, "%d.npz" % r))) for r in range(2)]
    assert_same_on_every_worker(results)
    # ... and what every worker holds is what one process learns from both shards.
    got = sorted(k for k in results[0] if k.startswith("got"))
    assert got
    for name in got:
        np.testing.assert_allclose(results[0][name], results[0]["ref" + name[3:]],
                                   rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.timeout(300)
def test_under_naive_engine_operations_on_the_native_engine_complete_before_the_push_returns(tmp_path):
    # NaiveEngine runs each operator synchronously: done is then Python's, never handed over.
    launch("api", tmp_path, workers=2, MXNET_ENGINE_TYPE="NaiveEngine", RDMAKV_TRANSPORT="tcp")


@pytest.mark.timeout(120)
def test_on_the_native_engine_a_failed_operation_reaches_mxnet_with_its_reason(cluster_factory):
    # Worker 0's pushpull waits in the native engine for worker 1's push when its server
    # dies: the failure goes the Python way, and reading the result raises it.
    from mxnet_worker import handed_to_the_engine
    cluster = cluster_factory(2, 1, RDMAKV_TRANSPORT="tcp")
    first, _ = cluster.connect()
    assert first._engine is not None
    kv = rmx.RdmaKV(first)
    try:
        result = mx.nd.zeros((8,))
        kv.pushpull("k", mx.nd.ones((8,)), out=result)
        handed_to_the_engine(first, set())
        cluster.procs[1].kill()
        # Its link's error, or the scheduler's report if that comes first.
        with pytest.raises(mx.base.MXNetError, match="server 0 .*(lost|disconnected unexpectedly)"):
            result.asnumpy()
        result[:] = 5                          # the array is usable afterwards
        np.testing.assert_array_equal(result.asnumpy(), np.full(8, 5.0))
    finally:
        kv.close()


# -- without a cluster ------------------------------------------------------

def test_registered_under_both_names_and_named_by_trainer_and_module():
    for name in rmx.NAMES:
        assert mx.kvstore.KVStoreBase.kv_registry[name] is rmx.RdmaKV
    for name in rmx.ASYNC_NAMES:
        assert mx.kvstore.KVStoreBase.kv_registry[name] is rmx.RdmaKVAsync
    from mxnet.gluon import trainer
    from mxnet.module import module
    for api in (mx.model, trainer, module):
        assert api._create_kvstore.rdmakv_wrapped is not None
    # Other names are MXNet's business, untouched.
    assert mx.model._create_kvstore("local", 1, {}) == (None, False)
    # MXNet's KVStoreBase names the capabilities a store is asked about (1.9.1: OPTIMIZER
    # only); both stores run the optimizer on the servers, and refuse other names as MXNet's do.
    named = {value for name, value in vars(mx.kvstore.KVStoreBase).items() if name.isupper()}
    assert named == {"optimizer"}, named
    for store in (rmx.RdmaKV, rmx.RdmaKVAsync):
        assert store.is_capable("optimizer") and store.is_capable("OPTIMIZER")
        with pytest.raises(ValueError, match="Unknown capability"):
            store.is_capable("sparse")


def test_importable_without_mxnet():
    script = ("import sys; sys.modules['mxnet'] = None\n"
              "import rdmakv.mxnet as m, rdmakv.mxnet.optimizer\n"
              "assert m._mx is None and m.RdmaKV.__bases__ == (object,)\n"
              "try:\n    m.RdmaKV()\nexcept ImportError as e:\n    print('ok', e)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr


@pytest.mark.timeout(120)
def test_optimizer_imports_mxnet_inside_a_server_process():
    # import mxnet with DMLC_ROLE=server would start MXNet's own server and hang.
    script = ("import rdmakv.mxnet.optimizer as o, os\n"
              "u = o.make_updater({'format': o.FORMAT, 'name': 'sgd', 'params': {"
              "'learning_rate': 0.1, 'wd': 0.0, 'rescale_grad': 1.0, 'clip_gradient': None, "
              "'begin_num_update': 0, 'multi_precision': False, 'momentum': 0.0, "
              "'lazy_update': True}, 'lr_scheduler': None, 'num_update': 0, 'lr_mult': {}, "
              "'wd_mult': {}})\n"
              "assert os.environ['DMLC_ROLE'] == 'server'\nprint('ok')\n")
    env = dict(os.environ, DMLC_ROLE="server", DMLC_PS_ROOT_URI="127.0.0.1",
               DMLC_PS_ROOT_PORT="1", DMLC_NUM_WORKER="1", DMLC_NUM_SERVER="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("data,message", [
    (b"", "too short"),
    (b"PICKLE!!" + bytes(12), "not written by rdmakv"),
    (rmx._STATES_PREFIX.pack(rmx.STATES_MAGIC, 9, 0), "version 9"),
    (rmx._STATES_PREFIX.pack(rmx.STATES_MAGIC, 1, 99) + b"{}", "truncated"),
    (rmx._STATES_PREFIX.pack(rmx.STATES_MAGIC, 1, 2) + b"[]", "bad header"),
    (rmx._STATES_PREFIX.pack(rmx.STATES_MAGIC, 1, 32)
     + b'{"servers":[5],"optimizer":null}', "do not add up"),
])
def test_hostile_states_file_rejected(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        rmx._parse_states_file(data, "f")
