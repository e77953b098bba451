"""Ties every process of a job to the launcher that started it, however the launcher ends.

    python -m rdmakv.control.lifeline           on a remote host, started over ssh by rdmakv.launch
reads one JSON line {"argv", "env", "cwd"} from stdin (so the environment, the secret
included, never appears on a command line), runs argv in its own process group and exits
with its status.  When stdin closes first (the launcher stopped the job, or died, or the
ssh connection dropped) it stops that group.

    python -m rdmakv.control.lifeline --guard   next to the launcher, in a session of its own
reads process-group ids, one a line.  When stdin closes without a "done" line (the launcher
was killed, even by SIGKILL), it stops those groups.

Stopping a group is SIGTERM, then SIGKILL after GRACE seconds: a process's own children
(data loaders, a shell's commands) go with it."""
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

GRACE = 3.0
MAX_SPEC_BYTES = 1 << 20
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl    # looked up here: a forked child must not dlopen


def die_with_parent():
    """A Popen preexec_fn: the kernel sends this process SIGTERM when its parent dies,
    even by SIGKILL (PR_SET_PDEATHSIG; it survives exec).  Only async-signal-safe work:
    the caller starts its children before it starts any thread."""
    parent = os.getppid()
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:      # the parent died before prctl took effect
        os._exit(1)


def stop_groups(groups, grace=GRACE, still_running=None):
    """SIGTERM each process group, wait up to `grace` seconds (until still_running() is
    false, when given), then SIGKILL whatever is left."""
    live = []
    for group in groups:
        try:
            os.killpg(group, signal.SIGTERM)
            live.append(group)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline and (still_running is None or still_running()):
        time.sleep(0.05)
    for group in live:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def guard(stream):
    """Stop the process groups named on `stream` unless it says "done" before it closes."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)      # only the launcher's end of the pipe ends a guard
    groups = []
    for line in stream:
        line = line.strip()
        if line == b"done":
            return 0
        if line.isdigit():
            groups.append(int(line))
    stop_groups(groups)
    return 0


def run_remote(stream):
    """Run the spec read from `stream` until it exits or `stream` closes."""
    spec = json.loads(stream.readline(MAX_SPEC_BYTES) or b"{}")
    argv, cwd = spec.get("argv"), spec.get("cwd")
    if not argv:
        print("rdmakv.lifeline: no command received from the launcher", file=sys.stderr, flush=True)
        return 1
    env = dict(os.environ, **spec.get("env", {}))
    try:
        child = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True,
                                 preexec_fn=die_with_parent)
    except OSError as exc:
        where = f" in {cwd}" if cwd else ""
        print(f"rdmakv.lifeline: cannot run {argv[0]}{where} on this host: {exc.strerror}", file=sys.stderr,
              flush=True)
        return 127

    def stop():
        stop_groups([child.pid], still_running=lambda: child.poll() is None)

    def hang_up():
        # The raw descriptor, not `stream`: a daemon thread blocked inside a buffered reader
        # makes the interpreter abort at exit.  Only the spec line came before the hang-up.
        while os.read(stream.fileno(), 4096):
            pass
        stop()

    signal.signal(signal.SIGTERM, lambda *_: stop())       # sshd's SIGTERM or a kill: the same
    signal.signal(signal.SIGHUP, signal.SIG_IGN)           # the session ended: stdin says so too
    threading.Thread(target=hang_up, daemon=True).start()
    code = child.wait()
    try:
        os.killpg(child.pid, signal.SIGKILL)   # what it started and left behind
    except (ProcessLookupError, PermissionError):
        pass
    return code if code >= 0 else 128 - code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    stream = sys.stdin.buffer
    return guard(stream) if argv == ["--guard"] else run_remote(stream)


if __name__ == "__main__":
    raise SystemExit(main())
