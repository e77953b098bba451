"""A single-process job, for `python train.py` started without a launcher.

With no job environment at all (no role, scheduler, worker-count or rank
variable, and no such keyword), a KVStore is the only worker of a job whose
scheduler and one server run as threads of this process on loopback, with a
random secret: sums are the values, and a server-side optimizer runs as in any
job (Horovod at size 1 behaves alike).  One of several processes started by
mpirun is refused instead, since it could only train alone."""
import dataclasses
import logging
import secrets
import threading

from rdmakv.core.config import environ_value
from rdmakv.core.errors import ConfigError

log = logging.getLogger("rdmakv.standalone")

JOB_SETTINGS = ("role", "scheduler_host", "scheduler_port", "num_workers", "num_servers", "worker_id")
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")   # Open MPI; MPICH and Intel MPI


def wanted(settings, environ):
    """Whether a KVStore(**settings) runs as a single-process job."""
    if any(settings.get(name) is not None for name in JOB_SETTINGS):
        return False
    if any(environ_value(name, environ)[0] is not None for name in JOB_SETTINGS):
        return False
    for variable in MPI_SIZE_VARIABLES:
        if environ.get(variable, "1") not in ("", "0", "1"):
            raise ConfigError(f"this process is one of {environ[variable]} started by mpirun ({variable}) but has no "
                              f"rdmakv job environment (DMLC_ROLE, DMLC_PS_ROOT_URI, ...): start the job with "
                              f"`mpirun ... rdmakv-run python train.py`, which gives each rank its role")
    return True


class LocalJob:
    """The scheduler and one server of a single-process job, each on a thread."""

    def __init__(self, config):
        from rdmakv.control.scheduler import Scheduler
        from rdmakv.server.server import ParameterServer
        # Nobody else may join: loopback only, and a secret that never leaves this process.
        job = dataclasses.replace(config, scheduler_host="127.0.0.1", num_workers=1, num_servers=1,
                                  worker_id=None, secret=secrets.token_hex(32), secret_file=None)
        self._threads = []
        self.scheduler = Scheduler(dataclasses.replace(job, role="scheduler", scheduler_port=0))
        self.server = None
        try:
            self.worker_config = dataclasses.replace(job, scheduler_port=self.scheduler.listener.address[1])
            self.server = ParameterServer(dataclasses.replace(self.worker_config, role="server", port=0))
        except BaseException:
            self.scheduler.close()
            raise
        for name, node in (("scheduler", self.scheduler), ("server", self.server)):
            thread = threading.Thread(target=self._run, args=(name, node), name=f"rdmakv-local-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("no job environment (no DMLC_ROLE, DMLC_PS_ROOT_URI or other job variable): running as a "
                 "single-process job, this process its only worker, its scheduler and one server in this "
                 "process on %s; `python -m rdmakv.launch -n WORKERS -s SERVERS -- python train.py` starts "
                 "a job of several", self.scheduler.address)

    @staticmethod
    def _run(name, node):
        try:
            node.run()
        except Exception:
            log.exception("the single-process job's %s failed", name)

    def close(self, timeout=10.0):
        """Wait for the scheduler and server to stop, which they do once the worker
        said goodbye (or left after joining); stop them at once if it never joined."""
        if self.scheduler._started:
            for thread in self._threads:
                thread.join(timeout)
        self.scheduler.close()
        self.server.close()
        for thread in self._threads:
            thread.join(timeout)
