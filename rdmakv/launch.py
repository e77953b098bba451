"""Run a whole rdmakv job on this machine, like bpslaunch or torchrun:

    python -m rdmakv.launch -n 2 -s 1 -- python train.py ARGS

starts the scheduler, the servers and the workers with DMLC_* set, prefixes
every output line with its role and rank, and stops everything, exiting
non-zero, as soon as any process fails."""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from rdmakv import netif


def free_port(host):
    family, sockaddr = netif.resolve(host, 0)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(sockaddr)
        return probe.getsockname()[1]


class Job:
    def __init__(self, args):
        self.args = args
        self.procs = []             # (label, Popen)
        self.pumps = []
        self.out_lock = threading.Lock()

    def start(self, label, argv, env):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((label, proc))
        pump = threading.Thread(target=self._pump, args=(label, proc), daemon=True)
        pump.start()
        self.pumps.append(pump)

    def _pump(self, label, proc):
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self.out_lock:
                print(f"[{label}] {line}", flush=True)
        proc.stdout.close()

    def stop(self, grace=5.0):
        for _, proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for _, proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # also reaps what the process itself started
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        for pump in self.pumps:
            pump.join(2.0)

    def run(self):
        """Exit status: 0 when every process succeeded, else the root failure's (see root_failure)."""
        workers = [proc for label, proc in self.procs if label.startswith("worker")]
        others = [(label, proc) for label, proc in self.procs if not label.startswith("worker")]
        shutdown_deadline = None
        while True:
            if any(proc.poll() not in (None, 0) for _, proc in self.procs):
                label, code = self.root_failure()
                with self.out_lock:
                    print(f"[launch] {label} exited with status {code}; stopping the job", flush=True)
                return code if code > 0 else 128 - code
            if all(proc.poll() == 0 for proc in workers):
                if all(proc.poll() is not None for _, proc in others):
                    return 0
                shutdown_deadline = shutdown_deadline or time.monotonic() + self.args.timeout
                if time.monotonic() > shutdown_deadline:
                    stuck = [label for label, proc in others if proc.poll() is None]
                    print(f"[launch] {', '.join(stuck)} did not exit after the workers finished", flush=True)
                    return 1
            time.sleep(0.05)

    def root_failure(self, settle=0.5):
        """(label, status) of the failure that most likely caused the others.

        One failure makes its peers fail within milliseconds (a worker's script exits 3, the
        scheduler then exits 1), and which of them this loop sees first is a race. So wait
        briefly for the cascade, then blame a process killed by a signal (never a consequence),
        else a worker (the user's own code), else whichever failed."""
        time.sleep(settle)
        failed = [(label, proc.poll()) for label, proc in self.procs if proc.poll() not in (None, 0)]
        failed.sort(key=lambda failure: (failure[1] > 0, not failure[0].startswith("worker")))
        return failed[0]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rdmakv.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-workers", type=int, default=2)
    parser.add_argument("-s", "--num-servers", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1", help="scheduler address (IPv4 or IPv6)")
    parser.add_argument("--port", type=int, default=0, help="scheduler port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds servers may take to exit once the workers are done")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the worker command after --")
    if args.num_workers < 1 or args.num_servers < 1:
        parser.error("need at least one worker and one server")

    base = dict(os.environ, PYTHONUNBUFFERED="1",
                DMLC_PS_ROOT_URI=args.host, DMLC_PS_ROOT_PORT=str(args.port or free_port(args.host)),
                DMLC_NUM_WORKER=str(args.num_workers), DMLC_NUM_SERVER=str(args.num_servers))
    server_argv = [sys.executable, "-m", "rdmakv.server"]
    job = Job(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        job.start("scheduler", server_argv, dict(base, DMLC_ROLE="scheduler"))
        for rank in range(args.num_servers):
            job.start(f"server {rank}", server_argv, dict(base, DMLC_ROLE="server"))
        for rank in range(args.num_workers):
            job.start(f"worker {rank}", command, dict(base, DMLC_ROLE="worker", DMLC_WORKER_ID=str(rank)))
        return job.run()
    except KeyboardInterrupt:
        return 130
    finally:
        job.stop()


if __name__ == "__main__":
    raise SystemExit(main())
