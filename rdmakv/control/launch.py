"""Run a whole rdmakv job with one command: on this machine like bpslaunch or
torchrun, across machines over ssh like horovodrun:

    python -m rdmakv.launch -n 3 -s 2 -- python train.py ARGS
    python -m rdmakv.launch -H host1:4,host2:4 -- python train.py ARGS

The first starts the scheduler, 2 servers and 3 workers here.  The second starts
4 workers (the host's slots) on each host over ssh, the scheduler on the first
host and one server per host (-n, -s and --server-hosts change that); the
variables that configure a job (RDMAKV_*, DMLC_*, BYTEPS_*, PS_*, MXNET_*, OMP_*,
PYTHON*, PATH, LD_LIBRARY_PATH, VIRTUAL_ENV and each -x NAME) go along, through
ssh's standard input, never on a command line.  Every output line is prefixed
with its [host role rank]; as soon as any process fails the rest are stopped and
the launcher exits with its status.  However the launcher ends (a signal, a
closed terminal, kill -9), every process of the job, here or remote, ends too."""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from rdmakv.control import lifeline
from rdmakv.core import netif
from rdmakv.core.config import environ_value, set_in_environ

FORWARDED_PREFIXES = ("RDMAKV_", "DMLC_", "BYTEPS_", "PS_", "MXNET_", "OMP_", "PYTHON")
FORWARDED_NAMES = ("PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV")
SSH_UNREACHABLE = 255           # ssh's own exit status when it cannot connect or run the command
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)


def parse_hosts(text):
    """"host1:4,host2:4" (horovodrun's -H; IPv6 in brackets, "[fd00::2]:2") -> [(host, slots)]."""
    hosts = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            slots = rest[1:] if rest.startswith(":") else (rest or "1")
        else:
            host, _, slots = item.partition(":")
            slots = slots or "1"
        if not host or not slots.isdigit() or int(slots) < 1:
            raise ValueError(f"bad host {item!r}: write HOST or HOST:SLOTS with SLOTS >= 1")
        hosts.append((host, int(slots)))
    if not hosts:
        raise ValueError("no host given")
    return hosts


class Job:
    """The processes of one job, each in a process group of its own, and a guard that
    stops those groups if the launcher dies without stopping them itself."""

    def __init__(self, timeout, ssh=None, remote_python=None):
        self.timeout = timeout
        self.ssh = ssh
        self.remote_python = remote_python
        self.procs = []             # (label, Popen, remote)
        self.exited_at = {}         # label -> when this launcher saw it exit
        self.pumps = []
        self.out_lock = threading.Lock()
        self.stop_signal = None     # set by a signal handler; run() stops on it
        self.guardian = subprocess.Popen([sys.executable, "-m", "rdmakv.control.lifeline", "--guard"],
                                         stdin=subprocess.PIPE, start_new_session=True)

    def say(self, line):
        with self.out_lock:
            try:
                print(line, flush=True)
            except OSError:          # the terminal is gone (SIGHUP): keep draining the children
                pass

    def start(self, label, argv, env, host=None):
        """Start argv here, or on host through ssh and rdmakv.lifeline.  Children must all be
        started before start_output(): their preexec_fn must not run beside other threads."""
        if host is None:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=lifeline.die_with_parent)
        else:
            remote = shlex.join([self.remote_python, "-m", "rdmakv.control.lifeline"])
            proc = subprocess.Popen([*self.ssh, "-o", "BatchMode=yes", host, remote], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=lifeline.die_with_parent)
            spec = {"argv": argv, "env": env, "cwd": os.getcwd()}
            proc.stdin.write(json.dumps(spec).encode() + b"\n")
            proc.stdin.flush()       # stdin stays open: its end is the remote process's hang-up
        self.procs.append((label, proc, host is not None))
        self.guardian.stdin.write(f"{proc.pid}\n".encode())
        self.guardian.stdin.flush()

    def start_output(self):
        for label, proc, _ in self.procs:
            pump = threading.Thread(target=self._pump, args=(label, proc), daemon=True)
            pump.start()
            self.pumps.append(pump)

    def _pump(self, label, proc):
        for raw in iter(proc.stdout.readline, b""):
            self.say(f"[{label}] {raw.decode(errors='replace').rstrip()}")
        proc.stdout.close()

    def stop(self, grace=lifeline.GRACE + 2.0):
        """Stop every process still running (a remote one by closing its lifeline's stdin, which
        stops it there), SIGKILL what is left after `grace` seconds, and release the guard."""
        for _, proc, remote in self.procs:
            if proc.poll() is not None:
                continue
            if remote:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            else:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for _, proc, _ in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc, _ in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # also what the process itself started
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        for pump in self.pumps:
            pump.join(2.0)
        try:
            self.guardian.stdin.write(b"done\n")
            self.guardian.stdin.close()
        except OSError:
            pass
        self.guardian.wait()

    def run(self):
        """Exit status: 0 when every process succeeded, else the root failure's (see root_failure)."""
        workers = [proc for label, proc, _ in self.procs if " worker " in f" {label} "]
        others = [(label, proc) for label, proc, _ in self.procs if proc not in workers]
        shutdown_deadline = None
        while True:
            if self.stop_signal is not None:
                self.say(f"[launch] {signal.Signals(self.stop_signal).name}: stopping the job")
                return 128 + self.stop_signal
            self._note_exits()
            if any(proc.poll() not in (None, 0) for _, proc, _ in self.procs):
                label, code, remote = self.root_failure()
                why = " (ssh could not reach the host or run the command there)" if (
                    remote and code == SSH_UNREACHABLE) else ""
                self.say(f"[launch] {label} exited with status {code}{why}; stopping the job")
                return code if code > 0 else 128 - code
            if all(proc.poll() == 0 for proc in workers):
                if all(proc.poll() is not None for _, proc in others):
                    return 0
                shutdown_deadline = shutdown_deadline or time.monotonic() + self.timeout
                if time.monotonic() > shutdown_deadline:
                    stuck = [label for label, proc in others if proc.poll() is None]
                    self.say(f"[launch] {', '.join(stuck)} did not exit after the workers finished")
                    return 1
            time.sleep(0.05)

    def root_failure(self, settle=0.5):
        """(label, status, remote) of the failure that most likely caused the others.

        One failure makes its peers fail within milliseconds (a worker's script exits 3, the
        scheduler and the other workers then exit 1), and which of them this loop sees first
        is a race. So watch the cascade briefly, then blame a process killed by a signal (never
        a consequence), else a worker (the user's own code), else any; among those, a status
        the script chose over 1 (what an uncaught error, such as a peer's failure, gives),
        then the first to exit."""
        end = time.monotonic() + settle
        while time.monotonic() < end:
            time.sleep(0.01)
            self._note_exits()
        failed = [(label, proc.poll(), remote) for label, proc, remote in self.procs
                  if proc.poll() not in (None, 0)]
        failed.sort(key=lambda failure: (failure[1] > 0, " worker " not in f" {failure[0]} ",
                                         failure[1] == 1, self.exited_at[failure[0]]))
        return failed[0]

    def _note_exits(self):
        now = time.monotonic()
        for label, proc, _ in self.procs:
            if label not in self.exited_at and proc.poll() is not None:
                self.exited_at[label] = now


def plan(args, command):
    """[(label, argv, env, host)] for every process of the job; host None means here."""
    if args.hosts is None:
        server_argv = [sys.executable, "-m", "rdmakv.server"]
        workers, servers = args.num_workers or 2, args.num_servers or 1
        scheduler = args.host or "127.0.0.1"
        base = dict(os.environ, PYTHONUNBUFFERED="1")
        set_in_environ(base, scheduler_host=scheduler, scheduler_port=args.port or netif.free_port(scheduler),
                     num_workers=workers, num_servers=servers)
        return ([("scheduler", server_argv, set_in_environ(dict(base), role="scheduler"), None)]
                + [(f"server {rank}", server_argv, set_in_environ(dict(base), role="server", server_id=rank), None)
                   for rank in range(servers)]
                + [(f"worker {rank}", command, set_in_environ(dict(base), role="worker", worker_id=rank), None)
                   for rank in range(workers)])
    hosts = parse_hosts(args.hosts)
    slots = [host for host, count in hosts for _ in range(count)]
    workers = args.num_workers or len(slots)
    if workers > len(slots):
        raise ValueError(f"-n {workers} workers, but the hosts have {len(slots)} slots")
    server_hosts = [host for host, _ in parse_hosts(args.server_hosts)] if args.server_hosts else [
        host for host, _ in hosts]
    servers = args.num_servers or len(server_hosts)
    server_argv = [args.remote_python or sys.executable, "-m", "rdmakv.server"]
    base = {name: value for name, value in os.environ.items()
            if name.startswith(FORWARDED_PREFIXES) or name in FORWARDED_NAMES}
    for item in args.export:
        name, equals, value = item.partition("=")
        base[name] = value if equals else os.environ.get(name, "")
    base["PYTHONUNBUFFERED"] = "1"
    scheduler = args.host or hosts[0][0]
    set_in_environ(base, scheduler_host=scheduler, scheduler_port=args.port or 9091,
                 num_workers=workers, num_servers=servers)
    first = hosts[0][0]
    return ([(f"{first} scheduler", server_argv, set_in_environ(dict(base), role="scheduler"), first)]
            + [(f"{server_hosts[rank % len(server_hosts)]} server {rank}", server_argv,
                set_in_environ(dict(base), role="server", server_id=rank), server_hosts[rank % len(server_hosts)])
               for rank in range(servers)]
            + [(f"{slots[rank]} worker {rank}", command,
                set_in_environ(dict(base), role="worker", worker_id=rank), slots[rank])
               for rank in range(workers)])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rdmakv.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-workers", type=int, help="workers (default: 2 here, every slot with -H)")
    parser.add_argument("-s", "--num-servers", type=int,
                        help="servers (default: 1 here, one per host with -H)")
    parser.add_argument("-H", "--hosts", help="HOST:SLOTS,... run over ssh: workers fill each host's slots "
                                              "in order; the scheduler runs on the first host")
    parser.add_argument("--server-hosts", help="HOST,... hosts the servers go to, in turn (default: the -H hosts)")
    parser.add_argument("--host", help="scheduler address (default: 127.0.0.1, or the first -H host)")
    parser.add_argument("--port", type=int, default=0,
                        help="scheduler port (default: RDMAKV_SCHEDULER_PORT or DMLC_PS_ROOT_PORT if set, "
                             "else a free one here; 9091 with -H)")
    parser.add_argument("-x", "--export", action="append", default=[], metavar="NAME[=VALUE]",
                        help="with -H, also pass this variable to every process (mpirun's -x)")
    parser.add_argument("--ssh", default="ssh", help="ssh command line, e.g. 'ssh -p 2222 -i key' (default: ssh)")
    parser.add_argument("--remote-python", help="python with rdmakv on the hosts (default: this one's path)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds servers may take to exit once the workers are done")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the worker command after --")
    if (args.num_workers is not None and args.num_workers < 1) or (
            args.num_servers is not None and args.num_servers < 1):
        parser.error("need at least one worker and one server")
    port, variable = environ_value("scheduler_port")    # the port the user's environment names, if any
    if not args.port and port is not None:
        try:
            args.port = int(port, 0)
        except ValueError:
            parser.error(f"{variable}={port!r} is not a port")
    try:
        processes = plan(args, command)
    except ValueError as exc:
        parser.error(str(exc))

    job = Job(args.timeout, shlex.split(args.ssh), args.remote_python or sys.executable)

    def on_signal(signum, _frame):
        job.stop_signal = signum
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    try:
        for label, argv, env, host in processes:
            job.start(label, argv, env, host)
        job.start_output()
        return job.run()
    except OSError as exc:
        job.say(f"[launch] cannot start {exc.filename or 'a process'}: {exc.strerror}")
        return 127
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)    # a second Ctrl-C must not cut the clean-up short
        job.stop()


if __name__ == "__main__":
    raise SystemExit(main())
