"""examples/kubernetes/mxjob.yaml, read the way Kubeflow's training operator reads it:
each replica gets the environment the operator adds (kubeflow.org/v1 MXJob, after
pkg/controller.v1/mxnet/pod.go SetClusterSpec) on top of its own, and with it
rdmakv-run gives every replica the right role, scheduler, counts and secret.  Then
the replicas' own commands run here as processes, and the job trains."""
import os
import subprocess
import sys

import pytest

from cluster import REPO
from rdmakv.core.config import Config
from rdmakv.core.netif import free_port

yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifest (pip install pyyaml; in the [test] extra)")

MANIFEST = os.path.join(REPO, "examples", "kubernetes", "mxjob.yaml")
SUM_CHECK = os.path.join(REPO, "tests", "sum_check.py")
DEFAULT_PORT = 9091            # the operator's default when no port is named mxjob-port


def load_job():
    with open(MANIFEST) as manifest:
        documents = [document for document in yaml.safe_load_all(manifest) if document]
    assert [document["kind"] for document in documents] == ["MXJob"]
    return documents[0]


def operator_env(job, replica_type, index):
    """What the training operator adds to every container of one replica."""
    specs = job["spec"]["mxReplicaSpecs"]
    scheduler = specs["Scheduler"]["template"]["spec"]["containers"]
    port = next((p["containerPort"] for c in scheduler if c["name"] == "mxnet" for p in c.get("ports", [])
                 if p["name"] == "mxjob-port"), DEFAULT_PORT)
    env = {"DMLC_PS_ROOT_PORT": str(port), "DMLC_PS_ROOT_URI": f"{job['metadata']['name']}-scheduler-0",
           "DMLC_NUM_SERVER": str(specs["Server"]["replicas"]), "DMLC_NUM_WORKER": str(specs["Worker"]["replicas"]),
           "DMLC_ROLE": replica_type.lower(), "DMLC_USE_KUBERNETES": "1"}
    if replica_type == "Worker":
        env["DMLC_WORKER_ID"] = str(index)
    return env


def replicas(job):
    """(replica type, index, pod spec, container, environment) for every pod the job makes."""
    for replica_type, spec in job["spec"]["mxReplicaSpecs"].items():
        for index in range(spec["replicas"]):
            pod = spec["template"]["spec"]
            container = next(c for c in pod["containers"] if c["name"] == "mxnet")
            env = {item["name"]: item["value"] for item in container.get("env", [])}
            yield replica_type, index, pod, container, dict(env, **operator_env(job, replica_type, index))


def secret_mount(pod, container, path):
    """The Secret a file path in the container comes from, with the key it reads."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/") and "secret" in volumes[mount["name"]]:
            return volumes[mount["name"]]["secret"]["secretName"], os.path.relpath(path, mount["mountPath"])
    return None


def test_every_replica_gets_its_role_the_scheduler_and_the_secret():
    job = load_job()
    assert job["apiVersion"] == "kubeflow.org/v1"
    seen = []
    for replica_type, index, pod, container, env in replicas(job):
        assert container["command"][0] == "rdmakv-run"
        assert job["spec"]["mxReplicaSpecs"][replica_type]["restartPolicy"] == "Never"
        config = Config.load(environ=env)
        assert config.role == replica_type.lower()
        assert (config.scheduler_host, config.scheduler_port) == ("rdmakv-train-scheduler-0", 9091)
        assert (config.num_workers, config.num_servers) == (4, 2)
        assert config.worker_id == (index if replica_type == "Worker" else None)
        assert "RDMAKV_SECRET" not in env
        assert secret_mount(pod, container, config.secret_file) == ("rdmakv-secret", "secret")
        if replica_type != "Scheduler":    # the data moves between servers and workers
            assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
        seen.append((config.role, index))
    assert sorted(seen) == [("scheduler", 0), ("server", 0), ("server", 1)] + [("worker", i) for i in range(4)]


def test_the_replicas_commands_run_a_job(tmp_path):
    """Every pod's command with its environment, here: the service name becomes 127.0.0.1, the
    Secret's mount a directory of the test, python this one and the training script a test's."""
    secret_dir = tmp_path / "etc-rdmakv"
    secret_dir.mkdir()
    (secret_dir / "secret").write_text("a secret for this test only\n")
    os.chmod(secret_dir / "secret", 0o400)
    port = str(free_port())
    procs = []
    try:
        for replica_type, _, _, container, env in replicas(load_job()):
            env = dict(os.environ, **env)
            env.update(PYTHONPATH=REPO, DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=port,
                       RDMAKV_SECRET_FILE=str(secret_dir / "secret"), RDMAKV_TIMEOUT="60")
            rdmakv_run, python, _script = container["command"]
            argv = [os.path.join(os.path.dirname(sys.executable), rdmakv_run), sys.executable, SUM_CHECK]
            assert python == "python"
            procs.append((replica_type, subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                                         stderr=subprocess.STDOUT, text=True)))
        outputs = [(replica_type, proc.communicate(timeout=120)[0], proc.returncode) for replica_type, proc in procs]
    finally:
        for _, proc in procs:
            proc.kill()
            proc.wait()
    for replica_type, output, code in outputs:
        assert code == 0, f"{replica_type}: {output}"
        assert "unauthenticated" not in output
    assert sorted(line for _, output, _ in outputs for line in output.splitlines() if line.startswith("OK")) == [
        f"OK rank {rank} of 4" for rank in range(4)]
