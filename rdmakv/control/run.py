"""rdmakv-run CMD ARGS: one command for every role of a job (what bpslaunch is to BytePS).

Launchers that start the same command everywhere and tell each process its role
(MXNet's tools/launch.py through dmlc-tracker, Kubeflow's MXJob, mpirun, srun) run

    rdmakv-run python train.py ARGS

In the scheduler or a server role this process becomes rdmakv's scheduler or
server and CMD is not run; in a worker role CMD replaces it (exec) with the job's
variables set.  The role comes from, in this order:

  RDMAKV_ROLE or DMLC_ROLE          set by dmlc-tracker, an MXJob, rdmakv.launch
  OMPI_COMM_WORLD_RANK, PMI_RANK    mpirun (Open MPI; MPICH and Intel MPI's Hydra)
  SLURM_PROCID                      srun

With an MPI or Slurm rank, rank 0 is the scheduler, the next S ranks the servers
(S from -s, else DMLC_NUM_SERVER, else 1) and the rest the workers, as MXNet's mpi
launcher does; the scheduler's address is the first host's (Slurm: the step's first
node; Open MPI: mpirun's host, which must be where rank 0 runs) unless
DMLC_PS_ROOT_URI is set, and its port is derived from the job id unless
DMLC_PS_ROOT_PORT is set.  With none of these variables CMD runs as it is."""
import argparse
import os
import re
import socket
import sys
import zlib

from rdmakv.core import netif
from rdmakv.core.config import environ_value, set_in_environ
from rdmakv.core.errors import ConfigError

PORT_BASE, PORT_SPAN = 10000, 20000     # derived ports stay below Linux's ephemeral range (32768-60999)


def _first(environ, *names):
    for name in names:
        if environ.get(name, "") != "":
            return environ[name]
    return None


def _setting(environ, name):
    return environ_value(name, environ)[0]


def first_slurm_host(nodelist):
    """The first host of a Slurm host list: "gpu[07-09,12],cpu1" -> "gpu07"."""
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    return re.sub(r"\[([^\]]*)\]", lambda match: re.split(r"[,-]", match.group(1))[0], nodelist[:end])


def _hnp_host(uri):
    """mpirun's own address from OMPI_MCA_orte_hnp_uri ("jobid.0;tcp://10.0.0.1,10.0.1.1:port;...")."""
    match = re.search(r"tcp://([^,;:]+)", uri or "")
    return match.group(1) if match else None


def rank_placement(environ):
    """(engine, rank, size, single_host, scheduler_host or None, job id) from mpirun's or srun's
    variables, or None when neither started this process."""
    if _first(environ, "OMPI_COMM_WORLD_RANK") is not None:
        size = int(environ["OMPI_COMM_WORLD_SIZE"])
        single = environ.get("OMPI_MCA_orte_num_nodes") == "1" or environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == str(size)
        return ("Open MPI", int(environ["OMPI_COMM_WORLD_RANK"]), size, single,
                _hnp_host(environ.get("OMPI_MCA_orte_hnp_uri")),
                _first(environ, "OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE") or "")
    if _first(environ, "PMI_RANK") is not None:
        size = int(environ["PMI_SIZE"])
        return ("MPI", int(environ["PMI_RANK"]), size, environ.get("MPI_LOCALNRANKS") == str(size), None,
                _first(environ, "PMI_KVSNAME", "PMI_JOBID") or "")
    if _first(environ, "SLURM_PROCID") is not None:
        size = int(_first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") or 1)
        nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        nodes = _first(environ, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
        return ("Slurm", int(environ["SLURM_PROCID"]), size, nodes == "1",
                first_slurm_host(nodelist) if nodelist else None,
                f"{environ.get('SLURM_JOB_ID', '')}.{environ.get('SLURM_STEP_ID', '')}")
    return None


def job_settings(environ, num_servers=None):
    """(settings to put in the environment, a line saying where they came from) for this
    process, or ({}, None) when its role is already set or no rank engine started it."""
    if _setting(environ, "role") is not None:
        return {}, None
    placement = rank_placement(environ)
    if placement is None:
        return {}, None
    engine, rank, size, single_host, first_host, job_id = placement
    servers = num_servers or int(_setting(environ, "num_servers") or 1)
    workers = size - 1 - servers
    if servers < 1 or workers < 1:
        raise ConfigError(f"{engine} started {size} processes: rank 0 is the scheduler and the next {servers} "
                          f"the servers, which leaves no worker; start at least {servers + 2}")
    declared = _setting(environ, "num_workers")
    if declared is not None and int(declared) != workers:
        raise ConfigError(f"DMLC_NUM_WORKER={declared}, but {engine} started {size} processes: 1 scheduler, "
                          f"{servers} servers and so {workers} workers")
    host = _setting(environ, "scheduler_host")
    if host is None:
        if single_host:
            host = "127.0.0.1"
        elif first_host is None:
            raise ConfigError(f"{engine} ran this job on several hosts: give the scheduler's (rank 0's) "
                              f"address in DMLC_PS_ROOT_URI (mpirun -x DMLC_PS_ROOT_URI=HOST)")
        else:
            host = first_host
    port = _setting(environ, "scheduler_port") or PORT_BASE + zlib.crc32(job_id.encode()) % PORT_SPAN
    settings = {"scheduler_host": host, "scheduler_port": port, "num_workers": workers,
                "num_servers": servers}
    if rank == 0:
        settings.update(role="scheduler")
        name = "the scheduler"
    elif rank <= servers:
        settings.update(role="server", server_id=rank - 1)
        name = f"server {rank - 1}"
    else:
        settings.update(role="worker", worker_id=rank - 1 - servers)
        name = f"worker {rank - 1 - servers}"
    where = netif.format_address(host, int(port))
    return settings, f"rdmakv-run: {engine} rank {rank} of {size} is {name} (scheduler at {where})"


def check_scheduler_is_here(host):
    """Rank 0 is the scheduler, at the address every other rank derived: make sure it is ours."""
    try:
        family, sockaddr = netif.resolve(host, 0)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(sockaddr)
    except (OSError, ConfigError):
        raise ConfigError(f"rank 0 (the scheduler) runs on {socket.gethostname()}, but the other ranks look "
                          f"for it at {host}, the job's first host: set DMLC_PS_ROOT_URI to rank 0's host "
                          f"(mpirun -x DMLC_PS_ROOT_URI=HOST)") from None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rdmakv-run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-s", "--num-servers", type=int,
                        help="with an MPI or Slurm rank: how many ranks after 0 are servers (default: "
                             "DMLC_NUM_SERVER, else 1)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command workers run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        settings, origin = job_settings(os.environ, args.num_servers)
        if settings.get("role") == "scheduler" and _setting(os.environ, "scheduler_host") is None:
            check_scheduler_is_here(settings["scheduler_host"])
        set_in_environ(os.environ, **settings)
        from rdmakv.core.config import Config
        role = Config.load().role
    except (ConfigError, ValueError) as exc:
        print(f"rdmakv-run: {exc}", file=sys.stderr)
        return 2
    if origin:
        print(origin, file=sys.stderr, flush=True)
    if role != "worker":
        from rdmakv.server import server
        return server.main()
    if not command:
        parser.error("give the command the workers run")
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"rdmakv-run: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    raise SystemExit(main())
