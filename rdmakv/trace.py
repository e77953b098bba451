"""Chrome-trace timeline (view in Perfetto or chrome://tracing).  With
RDMAKV_TRACE_DIR unset the tracer is None and every call site is one
`if tracer:` test."""
import json
import os
import threading
import time


class Tracer:
    def __init__(self, directory, role, rank):
        self.path = os.path.join(directory, f"rdmakv-{role}-{rank}.json")
        self._pid = os.getpid()
        self._events = []
        self._lock = threading.Lock()
        self._label = f"{role} {rank}"
        os.makedirs(directory, exist_ok=True)

    def instant(self, name, **args):
        event = {"name": name, "ph": "i", "s": "t", "ts": time.perf_counter_ns() / 1000,
                 "pid": self._pid, "tid": threading.get_native_id(), "args": args}
        with self._lock:
            self._events.append(event)

    def write(self):
        with self._lock:
            events = list(self._events)
        meta = {"name": "process_name", "ph": "M", "pid": self._pid, "args": {"name": f"rdmakv {self._label}"}}
        with open(self.path, "w") as out:
            json.dump({"traceEvents": [meta] + events, "displayTimeUnit": "ms"}, out)


def make(config, role, rank):
    return Tracer(config.trace_dir, role, rank) if config.trace_dir else None
