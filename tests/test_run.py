"""rdmakv-run: one command for every role.  Started the way dmlc-tracker, an MXJob or
mpirun start a job (the same command everywhere, the role from the environment or
the MPI rank), the job trains and exits 0; a script started in a server role is told
what to run instead."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import slurm
from cluster import REPO
from rdmakv.control.run import check_scheduler_is_here, first_slurm_host, job_settings
from rdmakv.core.errors import ConfigError
from rdmakv.core.netif import free_port

BIN = os.path.dirname(sys.executable)
RDMAKV_RUN = os.path.join(BIN, "rdmakv-run")
SUM_CHECK = os.path.join(REPO, "tests", "sum_check.py")

GLUON = textwrap.dedent("""
    import mxnet as mx              # first, as MXNet scripts do: in a server role this would hang
    from mxnet import autograd, gluon
    import rdmakv.mxnet  # noqa: F401

    kv = mx.kv.create("rdmakv")
    net = gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Constant(0.5))
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=kv)
    x = mx.nd.ones((2, 4)) * (kv.rank + 1)
    for _ in range(3):
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
        trainer.step(2)
    print(f"weights of rank {kv.rank}: {net.weight.data().asnumpy().sum():.6f}", flush=True)
    kv.close()
""")


def job_env(workers, servers, **extra):
    """What dmlc-tracker gives every process of a job, less the role."""
    return dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1", RDMAKV_TIMEOUT="30",
                DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(free_port()),
                DMLC_NUM_WORKER=str(workers), DMLC_NUM_SERVER=str(servers), **extra)


def run_every_role(argv, env, workers, servers, timeout=120):
    """Start the same argv as the scheduler, every server and every worker, only DMLC_ROLE
    differing; return [(role, returncode, output)]."""
    roles = ["scheduler"] + ["server"] * servers + ["worker"] * workers
    procs = [subprocess.Popen(argv, env=dict(env, DMLC_ROLE=role), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for role in roles]
    try:
        return [(role, proc.wait(timeout), proc.stdout.read()) for role, proc in zip(roles, procs)]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()


def test_the_same_command_in_every_role_runs_a_job():
    done = run_every_role([RDMAKV_RUN, sys.executable, SUM_CHECK], job_env(2, 2), workers=2, servers=2)
    for role, code, output in done:
        assert code == 0, f"{role}: {output}"
    outputs = [output for role, _, output in done if role == "worker"]
    assert sorted(line for output in outputs for line in output.splitlines() if line.startswith("OK")) == [
        "OK rank 0 of 2", "OK rank 1 of 2"]


@pytest.mark.mxnet
def test_an_mxnet_script_that_imports_mxnet_first_runs_in_every_role(tmp_path):
    pytest.importorskip("mxnet")
    script = tmp_path / "train.py"
    script.write_text(GLUON)
    done = run_every_role([RDMAKV_RUN, sys.executable, str(script)], job_env(2, 1), workers=2, servers=1)
    for role, code, output in done:
        assert code == 0, f"{role}: {output}"
    weights = sorted(line.split(": ")[1] for _, _, output in done for line in output.splitlines()
                     if line.startswith("weights of rank"))
    assert len(weights) == 2 and weights[0] == weights[1]


@pytest.mark.parametrize("role", ["server", "scheduler"])
def test_a_script_in_a_server_role_is_told_what_to_run(tmp_path, role):
    script = tmp_path / "train.py"
    script.write_text("import rdmakv\nprint('went on')\n")
    done = subprocess.run([sys.executable, str(script)], env=dict(job_env(1, 1), DMLC_ROLE=role),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "went on" not in done.stdout
    assert done.stderr.strip().splitlines() == [
        f"rdmakv: train.py was started as the {role} (DMLC_ROLE={role}), which is rdmakv's own process: "
        f"start every role with `rdmakv-run python train.py ...`, or run `rdmakv-server` in this role"]


def test_rdmakv_server_runs_a_scheduler_and_a_server():
    env = job_env(1, 1)
    procs = [subprocess.Popen([os.path.join(BIN, "rdmakv-server")], env=dict(env, DMLC_ROLE=role),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for role in ("scheduler", "server")]
    try:
        worker = subprocess.run([sys.executable, SUM_CHECK], env=dict(env, DMLC_ROLE="worker"),
                                capture_output=True, text=True, timeout=60)
        assert worker.returncode == 0 and "OK rank 0 of 1" in worker.stdout, worker.stderr
        assert [proc.wait(30) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stderr.close()


# ---- roles from an MPI or Slurm rank -------------------------------------------------------
# Recorded from `mpirun -np 5` (Open MPI 4.1.4), `srun -n 5` (Slurm 22.05) and MPICH's Hydra,
# trimmed to what rdmakv-run reads.
OPEN_MPI = {"OMPI_COMM_WORLD_SIZE": "5", "OMPI_COMM_WORLD_LOCAL_SIZE": "5", "OMPI_MCA_orte_num_nodes": "1",
            "OMPI_MCA_ess_base_jobid": "1143799809",
            "OMPI_MCA_orte_hnp_uri": "1143799808.0;tcp://192.0.2.2:39041;tcp6://[fd00::2]:37429"}
OPEN_MPI_2_HOSTS = dict(OPEN_MPI, OMPI_COMM_WORLD_LOCAL_SIZE="3", OMPI_MCA_orte_num_nodes="2",
                        OMPI_MCA_orte_hnp_uri="1143799808.0;tcp://198.51.100.7,10.0.0.7:39041")
SLURM = {"SLURM_NTASKS": "5", "SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_NODELIST": "gpu[07-09,12],cpu1",
         "SLURM_STEP_NUM_NODES": "5", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}
HYDRA = {"PMI_SIZE": "5", "MPI_LOCALNRANKS": "5", "PMI_KVSNAME": "kvs_3158_0"}


@pytest.mark.parametrize("recorded,rank_variable", [(OPEN_MPI, "OMPI_COMM_WORLD_RANK"), (SLURM, "SLURM_PROCID"),
                                                     (HYDRA, "PMI_RANK")])
def test_rank_0_is_the_scheduler_the_next_the_servers_and_the_rest_workers(recorded, rank_variable):
    roles = [job_settings(dict(recorded, **{rank_variable: str(rank)}), num_servers=2)[0] for rank in range(5)]
    assert [(s["role"], s.get("server_id"), s.get("worker_id")) for s in roles] == [
        ("scheduler", None, None), ("server", 0, None), ("server", 1, None), ("worker", None, 0),
        ("worker", None, 1)]
    assert {(s["num_workers"], s["num_servers"], s["scheduler_port"]) for s in roles} == {
        (2, 2, roles[0]["scheduler_port"])}
    assert 10000 <= roles[0]["scheduler_port"] < 30000
    host = "gpu07" if recorded is SLURM and recorded["SLURM_STEP_NUM_NODES"] != "1" else "127.0.0.1"
    assert {s["scheduler_host"] for s in roles} == {host}


def test_the_rank_mapping_takes_given_settings_and_refuses_what_does_not_add_up():
    env = dict(OPEN_MPI_2_HOSTS, OMPI_COMM_WORLD_RANK="3", DMLC_NUM_SERVER="1")
    settings, line = job_settings(env)
    assert settings["scheduler_host"] == "198.51.100.7"    # mpirun's host
    assert line == "rdmakv-run: Open MPI rank 3 of 5 is worker 1 (scheduler at 198.51.100.7:%d)" % (
        settings["scheduler_port"])
    settings, _ = job_settings(dict(env, DMLC_PS_ROOT_URI="10.1.1.1", DMLC_PS_ROOT_PORT="7000"))
    assert (settings["scheduler_host"], settings["scheduler_port"]) == ("10.1.1.1", "7000")
    assert job_settings(dict(env, DMLC_ROLE="server")) == ({}, None)      # a launcher already said
    assert job_settings({"PATH": "/bin"}) == ({}, None)
    assert job_settings(dict(env, OMPI_COMM_WORLD_RANK="0"))[0]["role"] == "scheduler"
    with pytest.raises(ConfigError, match="rank 0 .* runs on .* look for it at 198.51.100.7, the job's first host"):
        check_scheduler_is_here("198.51.100.7")     # what rdmakv-run checks as rank 0
    check_scheduler_is_here("127.0.0.1")
    with pytest.raises(ConfigError, match="leaves no worker; start at least 6"):
        job_settings(dict(OPEN_MPI, OMPI_COMM_WORLD_RANK="1"), num_servers=4)
    with pytest.raises(ConfigError, match="DMLC_NUM_WORKER=4, but Open MPI started 5 processes"):
        job_settings(dict(OPEN_MPI, OMPI_COMM_WORLD_RANK="1", DMLC_NUM_WORKER="4"))
    with pytest.raises(ConfigError, match="give the scheduler's .* address in DMLC_PS_ROOT_URI"):
        job_settings(dict(HYDRA, PMI_RANK="1", MPI_LOCALNRANKS="2"))


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("gpu[07-09,12],cpu1", "gpu07"),
                                            ("rack[2-3]-n[001-004]", "rack2-n001"), ("a,b[1-2]", "a")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed (ci/setup.sh: openmpi-bin)")
def test_mpirun_runs_a_job_from_ranks():
    env = job_env(3, 2)
    for name in ("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_WORKER", "DMLC_NUM_SERVER"):
        del env[name]        # all from the ranks
    argv = ["mpirun", "--oversubscribe", "-np", "6", "-x", "PYTHONPATH", "-x", "RDMAKV_TIMEOUT",
            RDMAKV_RUN, "-s", "2", sys.executable, SUM_CHECK]
    if os.geteuid() == 0:
        argv.insert(1, "--allow-run-as-root")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("OK")) == [
        "OK rank 0 of 3", "OK rank 1 of 3", "OK rank 2 of 3"]
    for rank, role in enumerate(["the scheduler", "server 0", "server 1", "worker 0", "worker 1", "worker 2"]):
        assert f"rdmakv-run: Open MPI rank {rank} of 6 is {role} (scheduler at 127.0.0.1:" in done.stderr


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if slurm.probe() is not None:
        pytest.skip(slurm.probe())
    cluster = slurm.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.close()


def slurm_env(cluster):
    env = dict(cluster.env, PYTHONPATH=REPO, PYTHONUNBUFFERED="1", RDMAKV_TIMEOUT="30",
               PATH=BIN + os.pathsep + os.environ["PATH"])
    for name in ("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_WORKER", "DMLC_NUM_SERVER", "DMLC_ROLE"):
        env.pop(name, None)
    return env


def test_srun_runs_a_job_from_ranks(slurm_cluster):
    done = subprocess.run(["srun", "-n", "5", "--overcommit", "rdmakv-run", "-s", "2", sys.executable, SUM_CHECK],
                          env=slurm_env(slurm_cluster), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("OK")) == [
        "OK rank 0 of 2", "OK rank 1 of 2"]
    for rank, role in enumerate(["the scheduler", "server 0", "server 1", "worker 0", "worker 1"]):
        assert f"rdmakv-run: Slurm rank {rank} of 5 is {role} (scheduler at 127.0.0.1:" in done.stderr


def test_the_sbatch_example_runs(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    # One node of 2 CPUs here: fewer nodes and tasks than the example asks for, and a time limit
    # within the test partition's.
    done = subprocess.run(["sbatch", "--wait", "-N", "1", "-n", "5", "--overcommit", "--time", "5", "-o", str(out),
                           os.path.join(REPO, "examples", "slurm", "rdmakv.sbatch"), sys.executable, SUM_CHECK],
                          env=slurm_env(slurm_cluster), capture_output=True, text=True, timeout=120)
    log = out.read_text() if out.exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + log
    assert sorted(line for line in log.splitlines() if line.startswith("OK")) == ["OK rank 0 of 2", "OK rank 1 of 2"]
