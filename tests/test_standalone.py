"""`python train.py` with no launcher and no job environment: a single-process job."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import rdmakv
from cluster import REPO
from rdmakv.control import standalone
from rdmakv.core.errors import ConfigError
from rdmakv.core.netif import free_port


def bare_env(**extra):
    """This environment without any job, MPI or rdmakv variable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DMLC_", "RDMAKV_", "BYTEPS_", "OMPI_", "PMI_"))}
    return dict(env, PYTHONPATH=REPO, **extra)


def run_script(source, env, timeout=60):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_script_without_a_launcher_is_the_only_worker_of_its_own_job():
    proc = run_script("""
        import threading
        import numpy as np
        import rdmakv
        with rdmakv.KVStore() as kv:
            assert (kv.rank, kv.num_workers, kv.num_servers) == (0, 1, 1)
            value = np.arange(3 << 20, dtype=np.int64)          # several chunks
            kv.pushpull("w", value)
            np.testing.assert_array_equal(value, np.arange(3 << 20))   # the sum over one worker
            out = np.empty(5, np.float32)
            kv.pushpull("b", np.full(5, 2.5, np.float32), out=out)
            assert out.tolist() == [2.5] * 5
            kv.broadcast("c", np.ones(4))
            kv.barrier()
        # The in-process scheduler and server are gone with the store.
        assert not [t.name for t in threading.enumerate() if t.name.startswith("rdmakv-local")]
        print("ok")
        """, bare_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"


def test_the_single_process_job_says_what_it_is_in_the_log():
    proc = run_script("""
        import logging
        logging.basicConfig(level=logging.INFO)
        import rdmakv
        rdmakv.KVStore().close()
        """, bare_env())
    assert proc.returncode == 0, proc.stderr
    assert "running as a single-process job" in proc.stderr and "python -m rdmakv.launch" in proc.stderr


@pytest.mark.mxnet
def test_a_server_side_optimizer_works_in_a_single_process_job():
    pytest.importorskip("mxnet")
    proc = run_script("""
        import mxnet as mx
        import numpy as np
        import rdmakv.mxnet
        kv = mx.kv.create("rdmakv")
        kv.set_optimizer(mx.optimizer.SGD(learning_rate=0.5, rescale_grad=1.0))
        weight = mx.nd.array(np.full(6, 3.0, np.float32))
        kv.init(0, weight)
        kv.pushpull(0, mx.nd.ones(6), out=weight)
        assert weight.asnumpy().tolist() == [2.5] * 6, weight.asnumpy()
        kv.close()
        print("ok")
        """, bare_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"


@pytest.mark.parametrize("variable", ["DMLC_ROLE", "DMLC_PS_ROOT_PORT", "RDMAKV_NUM_WORKERS", "DMLC_WORKER_ID"])
def test_any_job_variable_means_joining_a_scheduler(variable):
    values = {"DMLC_ROLE": "worker", "DMLC_PS_ROOT_PORT": "9091", "RDMAKV_NUM_WORKERS": "2", "DMLC_WORKER_ID": "0"}
    assert not standalone.wanted({}, {variable: values[variable]})
    assert not standalone.wanted({"scheduler_port": 9091}, {})
    assert standalone.wanted({"timeout": 5}, {"RDMAKV_TIMEOUT": "5", "DMLC_INTERFACE": "lo"})


def test_a_job_variable_still_waits_for_its_scheduler():
    port = free_port()
    proc = run_script("""
        import rdmakv
        rdmakv.KVStore()
        """, bare_env(DMLC_PS_ROOT_PORT=str(port), RDMAKV_TIMEOUT="1"))
    assert proc.returncode != 0 and f"127.0.0.1:{port}" in proc.stderr, proc.stderr


def test_one_of_several_mpi_ranks_without_a_role_is_refused():
    with pytest.raises(ConfigError, match="one of 4 started by mpirun .* rdmakv-run"):
        standalone.wanted({}, {"OMPI_COMM_WORLD_SIZE": "4"})
    assert standalone.wanted({}, {"OMPI_COMM_WORLD_SIZE": "1"})


def test_a_failed_single_process_start_leaves_nothing_running(monkeypatch):
    for variable in list(os.environ):
        if variable.startswith(("DMLC_", "RDMAKV_")):
            monkeypatch.delenv(variable)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(rdmakv.ConfigError, match="does not exist"):
        rdmakv.KVStore(interface="nosuch0", timeout=5)
    assert not [t.name for t in threading.enumerate()
                if t.ident not in before and t.name.startswith("rdmakv-local")]


def test_a_single_process_job_runs_in_asynchronous_mode():
    # The in-process server takes the store's mode: each pushpull adds into the stored value.
    proc = run_script("""
        import numpy as np, rdmakv
        with rdmakv.KVStore(mode="async") as kv:
            print([int(kv.pushpull("k", np.full(3, 5, np.int64))[0]) for _ in range(3)])
    """, bare_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "[5, 10, 15]", proc.stderr[-2000:]
