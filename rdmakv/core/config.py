"""rdmakv's settings: keyword arguments override RDMAKV_* variables, which
override the DMLC_* / BYTEPS_* names that BytePS and ps-lite launchers set."""
import difflib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Optional

from rdmakv.core.errors import ConfigError

MiB = 1 << 20


def _int(text):
    return int(text, 0)


def _positive_float(text):
    value = float(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _role(text):
    text = text.strip().lower()
    if text not in ("worker", "server", "scheduler"):
        raise ValueError("must be worker, server or scheduler")
    return text


def _transport(text):
    text = text.strip().lower()
    aliases = {"ibverbs": "verbs", "1": "verbs", "zmq": "tcp", "0": "auto", "": "auto"}
    text = aliases.get(text, text)
    if text not in ("auto", "verbs", "tcp", "shm"):
        raise ValueError("must be auto, verbs, tcp or shm")
    return text


def _enable_rdma(text):
    """ps-lite's DMLC_ENABLE_RDMA: 1 or ibverbs asks for verbs; 0 leaves the choice to auto."""
    text = text.strip().lower()
    if text in ("1", "ibverbs"):
        return "verbs"
    if text in ("0", ""):
        return "auto"
    raise ValueError("must be 1 or ibverbs (verbs) or 0 (auto); "
                     "RDMAKV_TRANSPORT chooses among auto, verbs, tcp and shm")


def _engine(text):
    text = text.strip().lower()
    if text not in ("native", "python"):
        raise ValueError("must be native or python")
    return text


def _mode(text):
    text = text.strip().lower()
    if text not in ("sync", "async"):
        raise ValueError("must be sync or async")
    return text


def _switch(text):
    text = text.strip().lower()
    if text in ("1", "on", "true", "yes"):
        return True
    if text in ("0", "off", "false", "no"):
        return False
    raise ValueError("must be 1 or 0")


def _str(text):
    return text


_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _byte_count(text):
    """Bytes, with an optional binary suffix: 8G, 512M, 1.5T."""
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _SIZE_SUFFIXES.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    value = int(float(number) * scale) if scale > 1 else int(number, 0)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def machine_memory():
    """Bytes of memory this process may use: physical memory, or less under a cgroup limit."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
        break
    return total


# A variable with values of its own, read instead of the setting's parser.
VARIABLE_PARSERS = {"DMLC_ENABLE_RDMA": _enable_rdma}

# RDMAKV_* variables read outside Config: by the transports (through other_variable), and by the tools,
# tests and CI scripts.
OTHER_VARIABLES = {
    "RDMAKV_SHM": "0 forbids shared memory",
    "RDMAKV_SHM_RING_BYTES": "bytes of each shared-memory ring",
    "RDMAKV_SHM_ALLOW_UIDS": "other uids that may share memory with this process",
    "RDMAKV_IB_DEVICE": "RDMA device", "RDMAKV_IB_PORT": "RDMA port", "RDMAKV_GID_INDEX": "RoCE GID index",
    "RDMAKV_BENCH_FUSE": "tools/bench_kvstore.py: fuse small tensors",
    "RDMAKV_FUZZ_SECONDS": "tests: fuzzing time", "RDMAKV_FUZZ_HYPOTHESIS": "tests: hypothesis examples",
    "RDMAKV_ATHERIS_SECONDS": "tests: atheris time", "RDMAKV_LOAD_ROUNDS": "tests: load-test rounds",
    "RDMAKV_PYTHON": "ci/rxe.sh: the Python to run in the VM",
    "RDMAKV_SANITIZE": "setup.py: build the extension for ci/sanitize.sh",
}


def unknown_variables(environ=None):
    """[(RDMAKV_* variable that nothing reads, the closest known name or None)]."""
    environ = os.environ if environ is None else environ
    known = [v for variables, *_ in SETTINGS.values() for v in variables if v.startswith("RDMAKV_")]
    known += OTHER_VARIABLES
    return [(name, next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.8)), None))
            for name in sorted(environ) if name.startswith("RDMAKV_") and name not in known]


def warn_unknown_variables(environ=None):
    for name, closest in unknown_variables(environ):
        hint = f"did you mean {closest}?" if closest else "`python -m rdmakv.info --json` lists the variables"
        warnings.warn(f"{name} is not an rdmakv setting and is ignored; {hint}", UserWarning, stacklevel=3)


# name: (environment variables, highest precedence first; parser; default; meaning)
SETTINGS = {
    "role": (("RDMAKV_ROLE", "DMLC_ROLE"), _role, "worker",
             "worker, server or scheduler"),
    "scheduler_host": (("RDMAKV_SCHEDULER_HOST", "DMLC_PS_ROOT_URI"), _str, "127.0.0.1",
                       "address of the scheduler (IPv4, IPv6 or host name)"),
    "scheduler_port": (("RDMAKV_SCHEDULER_PORT", "DMLC_PS_ROOT_PORT"), _int, 9091,
                       "TCP port of the scheduler"),
    "num_workers": (("RDMAKV_NUM_WORKERS", "DMLC_NUM_WORKER"), _int, 1, "number of workers"),
    "num_servers": (("RDMAKV_NUM_SERVERS", "DMLC_NUM_SERVER"), _int, 1, "number of servers"),
    "worker_id": (("RDMAKV_WORKER_ID", "DMLC_WORKER_ID"), _int, None,
                  "this worker's rank (default: assigned by the scheduler in arrival order)"),
    "server_id": (("RDMAKV_SERVER_ID",), _int, None,
                  "this server's rank (default: assigned by the scheduler in arrival order)"),
    "interface": (("RDMAKV_INTERFACE", "DMLC_INTERFACE"), _str, None,
                  "network interface whose address this node advertises and listens on"),
    "node_host": (("RDMAKV_NODE_HOST", "DMLC_NODE_HOST"), _str, None,
                  "address this node advertises (default: from the interface, else the route to the scheduler)"),
    "port": (("RDMAKV_PORT", "PORT"), _int, 0, "port a server listens on (0: any free port)"),
    "transport": (("RDMAKV_TRANSPORT", "DMLC_ENABLE_RDMA"), _transport, "auto",
                  "auto, verbs, tcp or shm (DMLC_ENABLE_RDMA=ibverbs means verbs; RDMAKV_SHM=0 forbids shm)"),
    "partition_bytes": (("RDMAKV_PARTITION_BYTES", "BYTEPS_PARTITION_BYTES"), _int, 4 * MiB,
                        "tensors larger than this are split into chunks of at most this size"),
    "scheduling_credit": (("RDMAKV_SCHEDULING_CREDIT", "BYTEPS_SCHEDULING_CREDIT"), _int, 4,
                          "partitions in flight per server; 0 turns the credit off"),
    "timeout": (("RDMAKV_TIMEOUT",), _positive_float, 120.0,
                "seconds any blocking step (connect, joining, barrier, pushpull, a peer's silence) may take"),
    "trace_dir": (("RDMAKV_TRACE_DIR", "BYTEPS_TRACE_DIR"), _str, None,
                  "write a Chrome-trace JSON per rank into this directory"),
    "trace_on": (("RDMAKV_TRACE_ON", "BYTEPS_TRACE_ON"), _switch, None,
                 "1 traces (into trace_dir, default ./traces), 0 does not (default: trace when trace_dir is set)"),
    "trace_start_step": (("RDMAKV_TRACE_START_STEP", "BYTEPS_TRACE_START_STEP"), _int, 0,
                         "first step traced (a step is a round of the first key declared)"),
    "trace_end_step": (("RDMAKV_TRACE_END_STEP", "BYTEPS_TRACE_END_STEP"), _int, None,
                       "last step traced (default: to the end)"),
    "secret": (("RDMAKV_SECRET",), _str, None,
               "cluster secret: every connection must prove it (HMAC challenge-response)"),
    "secret_file": (("RDMAKV_SECRET_FILE",), _str, None, "file holding the cluster secret"),
    "integrity": (("RDMAKV_INTEGRITY",), _switch, False,
                  "MAC every TCP frame with a per-connection key derived from the secret (needs a secret)"),
    "local_rank": (("RDMAKV_LOCAL_RANK", "BYTEPS_LOCAL_RANK"), _int, None,
                   "rank among the workers on this host (default: computed by the scheduler)"),
    "engine": (("RDMAKV_ENGINE",), _engine, "native",
               "native: pushpulls are sent, summed and completed in native threads where the links allow it "
               "(TCP without RDMAKV_INTEGRITY, no trace); python: always on the Python data path"),
    "mode": (("RDMAKV_MODE",), _mode, "sync",
             "sync: a pushpull returns the sum of every worker's push of that round; async: a server applies each "
             "push as it arrives (adds it into the stored value, or runs the server-side optimizer on it) and "
             "answers that worker with the value then, without waiting for the others (alike on every worker and "
             "server)"),
    "spin_us": (("RDMAKV_SPIN_US",), _int, 0,
                "microseconds a native engine's reader (and a waiting caller) polls for the next message "
                "before sleeping; 0: sleep at once (best where cores are few)"),
    "hierarchy": (("RDMAKV_HIERARCHY",), _switch, True,
                  "1: workers sharing a host (kernel and network namespace) sum their pushes there first, and one "
                  "of them (the host's local root) pushes the host's sum to each server on another host and hands "
                  "the result back through shared memory (native data path, sync mode, every node alike); "
                  "0: every worker pushes its own copy"),
    "server_memory": (("RDMAKV_SERVER_MEMORY",), _byte_count, None,
                      "bytes a server may commit for the keys workers declare (default: this machine's memory)"),
}


@dataclass
class Config:
    role: str = "worker"
    scheduler_host: str = "127.0.0.1"
    scheduler_port: int = 9091
    num_workers: int = 1
    num_servers: int = 1
    worker_id: Optional[int] = None
    server_id: Optional[int] = None
    interface: Optional[str] = None
    node_host: Optional[str] = None
    port: int = 0
    transport: str = "auto"
    partition_bytes: int = 4 * MiB
    scheduling_credit: int = 4
    timeout: float = 120.0
    trace_dir: Optional[str] = None
    trace_on: Optional[bool] = None
    trace_start_step: int = 0
    trace_end_step: Optional[int] = None
    local_rank: Optional[int] = None
    server_memory: Optional[int] = None
    engine: str = "native"
    mode: str = "sync"
    spin_us: int = 0
    hierarchy: bool = True
    secret: Optional[str] = field(default=None, repr=False)
    secret_file: Optional[str] = None
    integrity: bool = False
    sources: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, environ=None, **overrides):
        """Settings from keyword arguments, then the environment, then defaults."""
        environ = os.environ if environ is None else environ
        warn_unknown_variables(environ)
        unknown = set(overrides) - set(SETTINGS)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values, sources = {}, {}
        for name, (variables, parse, default, _) in SETTINGS.items():
            if name in overrides and overrides[name] is not None:
                raw, source = overrides[name], f"keyword {name}"
            else:
                raw, source = environ_value(name, environ)
                if raw is None:
                    raw, source = default, "default"
                else:
                    parse = VARIABLE_PARSERS.get(source, parse)
            if isinstance(raw, str) and parse is not _str:
                try:
                    raw = parse(raw)
                except ValueError as exc:
                    raise ConfigError(f"{source}={raw!r}: {exc}") from None
            elif raw is not None and parse in (_role, _transport):
                raw = parse(raw)
            values[name], sources[name] = raw, source
        config = cls(**values, sources=sources)
        config.validate()
        return config

    def validate(self):
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_servers < 1:
            raise ConfigError(f"num_servers must be >= 1, got {self.num_servers}")
        if self.worker_id is not None and not 0 <= self.worker_id < self.num_workers:
            raise ConfigError(f"worker_id {self.worker_id} is outside 0..{self.num_workers - 1}")
        if self.server_id is not None and not 0 <= self.server_id < self.num_servers:
            raise ConfigError(f"server_id {self.server_id} is outside 0..{self.num_servers - 1}")
        if not 0 < self.scheduler_port < 65536:
            raise ConfigError(f"scheduler_port {self.scheduler_port} is not a TCP port")
        if self.partition_bytes < 8:
            raise ConfigError(f"partition_bytes must be >= 8, got {self.partition_bytes}")
        if self.scheduling_credit < 0:
            raise ConfigError("scheduling_credit must be >= 0")
        if self.integrity and not (self.secret or self.secret_file):
            raise ConfigError("RDMAKV_INTEGRITY needs a cluster secret (RDMAKV_SECRET or RDMAKV_SECRET_FILE): "
                              "the frames' MAC keys are derived from it")
        if self.integrity and importlib.util.find_spec("blake3") is None:
            raise ConfigError("RDMAKV_INTEGRITY needs the blake3 package for its MACs: "
                              "pip install blake3 (or rdmakv[integrity])")
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"mode must be sync or async, got {self.mode!r}")
        if self.server_memory is not None and self.server_memory <= 0:
            raise ConfigError(f"server_memory must be > 0, got {self.server_memory}")
        if self.trace_start_step < 0:
            raise ConfigError(f"trace_start_step must be >= 0, got {self.trace_start_step}")
        if self.trace_end_step is not None and self.trace_end_step < self.trace_start_step:
            raise ConfigError(f"trace_end_step {self.trace_end_step} is before trace_start_step "
                              f"{self.trace_start_step}")

    def describe(self):
        """[(setting, value, where it came from)] for `python -m rdmakv.info`."""
        shown = [(f.name, getattr(self, f.name), self.sources.get(f.name, "default"))
                 for f in fields(self) if f.name != "sources"]
        return [(name, "(set)" if name == "secret" and value else value, source) for name, value, source in shown]


def environ_value(name, environ=None):
    """(text, variable) of a setting from the first of its variables set (non-empty) in
    environ, highest precedence first; (None, None) where none is."""
    environ = os.environ if environ is None else environ
    for variable in SETTINGS[name][0]:
        if environ.get(variable, "") != "":
            return environ[variable], variable
    return None, None


def other_variable(variable, environ=None):
    """The text of one of OTHER_VARIABLES (settings of the transports, read outside Config),
    or None where it is unset; a variable not declared there is a KeyError, so what
    rdmakv reads and what `python -m rdmakv.info` and the unknown-variable warning know agree."""
    if variable not in OTHER_VARIABLES:
        raise KeyError(f"{variable} is not declared in rdmakv.core.config.OTHER_VARIABLES")
    environ = os.environ if environ is None else environ
    return environ.get(variable)


def set_in_environ(environ, **settings):
    """Set each setting in environ through its DMLC_* name where it has one (what MXNet and
    BytePS scripts read), dropping its other names, which would take precedence."""
    for name, value in settings.items():
        variables = SETTINGS[name][0]
        for variable in variables:
            environ.pop(variable, None)
        environ[variables[-1]] = str(value)
    return environ
