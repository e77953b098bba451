"""A one-node Slurm cluster for tests: slurmctld and slurmd from Debian's slurm-wlm,
started in the foreground with a configuration, state and logs in a directory of the
test's own (auth/none: nothing else on the machine is read or changed)."""
import os
import shutil
import socket
import subprocess
import time

from rdmakv.core.netif import free_port

CONFIG = """\
ClusterName=rdmakvtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=10 State=UP OverSubscribe=YES
"""


def probe():
    """None if Slurm's daemons are installed, else why not."""
    if not all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "srun", "sbatch", "sinfo")):
        return "Slurm is not installed (ci/setup.sh installs slurmctld, slurmd and slurm-client)"
    if os.geteuid() != 0:
        return "slurmd needs root"
    return None


class SlurmCluster:
    """slurmctld + slurmd on this machine; `env` points Slurm's commands at it."""

    def __init__(self, directory):
        self.dir = str(directory)
        for sub in ("state", "spool"):
            os.makedirs(f"{self.dir}/{sub}", exist_ok=True)
        host = socket.gethostname()
        # slurmd -C prints this node's real shape; a configuration claiming more makes it drain.
        # (Less its memory, which varies a little from run to run.)
        shape = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        node = " ".join(field for field in shape.split() if not field.startswith("RealMemory="))
        self.config = f"{self.dir}/slurm.conf"
        with open(self.config, "w") as config:
            config.write(CONFIG.format(host=host, dir=self.dir, ctld_port=free_port(), d_port=free_port(),
                                       node=node))
        self.env = dict(os.environ, SLURM_CONF=self.config)
        self.daemons = []
        try:
            for argv in (["slurmctld", "-D", "-f", self.config], ["slurmd", "-D", "-f", self.config, "-N", host]):
                self.daemons.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                     start_new_session=True))
            self._wait_until_idle()
        except BaseException:
            self.close()
            raise

    def _wait_until_idle(self, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            if state == "idle":
                return
            if time.monotonic() > deadline or any(daemon.poll() is not None for daemon in self.daemons):
                logs = ""
                for name in ("slurmctld.log", "slurmd.log"):
                    if os.path.exists(f"{self.dir}/{name}"):
                        with open(f"{self.dir}/{name}") as log:
                            logs += f"--- {name}\n" + "".join(log.readlines()[-15:])
                raise RuntimeError(f"the Slurm node did not become idle (state {state!r})\n{logs}")
            time.sleep(0.2)

    def close(self):
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(daemon.pid, 9)
                    daemon.wait()
        self.daemons = []
