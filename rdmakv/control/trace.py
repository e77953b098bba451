"""Chrome-trace timeline (view in Perfetto or chrome://tracing).

Each traced rank streams DIR/rdmakv-<role>-<rank>.json as it goes: an instant
event per stage of every chunk (worker: queued, sent, received; server: push
per worker, summed) and a duration event for the time between stages (the
send queue; the server's push, sum and result; gathering the round's pushes).
Only the steps from trace_start_step to trace_end_step are written.  Step n
is round n of the first key declared (on a server: of the first key it holds
chunks of), and every other operation belongs to the step in which it
started: in training, where each key is pushpulled once per step, step n is
the n-th training step (0-based).  Past the last step the file is finished.
With tracing off the tracer is None and every call site is one `if tracer:`
test.  A file whose process died lacks only the closing `]}`."""
import json
import os
import threading
import time

# stage: (the stage whose first occurrence starts the span that this one ends, the span's name)
SPANS = {
    "sent": ("queued", "send queue"),
    "received": ("sent", "push, sum and result"),
    "summed": ("push", "gather pushes"),
}
SPAN_STARTS = {start for start, _ in SPANS.values()}
DEFAULT_DIR = "traces"          # BytePS's, when BYTEPS_TRACE_ON=1 names no BYTEPS_TRACE_DIR


class Tracer:
    def __init__(self, directory, role, rank, start_step=0, end_step=None):
        self.path = os.path.join(directory, f"rdmakv-{role}-{rank}.json")
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._start_step = start_step
        self._end_step = end_step
        self.step = 0
        self.active = start_step == 0
        self._marks = {}              # ((key, chunk, round), stage) -> when that stage began a span
        self._next_id = 0
        os.makedirs(directory, exist_ok=True)
        self._out = open(self.path, "w")
        meta = {"name": "process_name", "ph": "M", "pid": self._pid, "args": {"name": f"rdmakv {role} {rank}"}}
        # traceEvents last, so a file cut short by a crash needs only its closing "]}".
        self._out.write('{"displayTimeUnit": "ms", "traceEvents": [\n' + json.dumps(meta))

    def begin_step(self, step):
        """A round of the first key declared started: the events that follow belong to this step."""
        with self._lock:
            if step <= self.step:
                return
            self.step = step
            self.active = self._start_step <= step and (self._end_step is None or step <= self._end_step)
            finished = self._end_step is not None and step > self._end_step
        if finished:
            self.write()

    def stage(self, name, **args):
        """A chunk reached stage `name`; args name its key, chunk and round."""
        if not self.active:
            return
        now = time.perf_counter_ns() / 1000
        tid = threading.get_native_id()
        ident = (args["key"], args["chunk"], args["round"])
        events = [{"name": name, "ph": "i", "s": "t", "ts": now, "pid": self._pid, "tid": tid, "args": args}]
        with self._lock:
            if self._out is None:
                return
            if name in SPANS:
                start, span = SPANS[name]
                began = self._marks.pop((ident, start), None)
                if began is not None:
                    # An async slice: chunks overlap on one thread, which complete ("X") events may not.
                    self._next_id += 1
                    common = {"name": span, "cat": "chunk", "id": self._next_id, "pid": self._pid, "tid": tid}
                    events.append(dict(common, ph="b", ts=began, args=args))
                    events.append(dict(common, ph="e", ts=now))
            if name in SPAN_STARTS:
                self._marks.setdefault((ident, name), now)   # a round's first push starts the gathering
            # One event a line, the comma first: a file cut short is valid up to its last whole line.
            self._out.write("".join("\n," + json.dumps(event) for event in events))

    def write(self):
        """Finish the file (idempotent): later stages are not recorded."""
        with self._lock:
            out, self._out = self._out, None
            self.active = False
            self._marks.clear()
        if out is not None:
            out.write('\n]}\n')
            out.close()


def enabled(config):
    """Whether config asks for a trace."""
    return config.trace_on if config.trace_on is not None else bool(config.trace_dir)


def make(config, role, rank):
    """The rank's Tracer, or None when tracing is off."""
    if not enabled(config):
        return None
    return Tracer(config.trace_dir or DEFAULT_DIR, role, rank, config.trace_start_step, config.trace_end_step)
