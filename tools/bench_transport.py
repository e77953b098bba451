#!/usr/bin/env python3
"""Point-to-point throughput and latency of an rdmakv transport, in the spirit
of ib_write_bw / ib_send_lat / qperf.

    .venv/bin/python tools/bench_transport.py [--transport tcp] [--quick] [--json FILE] [--plot FILE.png]
    .venv/bin/python tools/bench_transport.py --serve --host 0.0.0.0 --port 18515     # on host B
    .venv/bin/python tools/bench_transport.py --connect HOSTB:18515                   # on host A

Two processes talk through the transport's Connection API (rdmakv/transport/base.py):
each message is a 48-byte rdmakv header plus a payload sent from and received into
preallocated arrays.  For every size from 8 B to 64 MiB:

  bandwidth  the client streams messages back to back, then waits for a
             BARRIER_DONE; bytes / elapsed (GB/s = 1e9 B/s, Gbit/s = 1e9 bit/s).
             Over a transport that places data remotely (verbs) the server
             keeps buffers offered for the next OFFER_WINDOW messages, so
             each is one RDMA write into a known buffer, as in ib_write_bw
  msg rate   messages / elapsed in that stream
  latency    ping-pong: the server echoes each message; half the round trip,
             p50 and p99 (what ib_send_lat reports)

Without --connect it starts the server itself as a child process on 127.0.0.1.
"""
import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:          # runnable as a plain script from a checkout
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from rdmakv.core import protocol  # noqa: E402
from rdmakv.core.protocol import Op  # noqa: E402

MAX_SIZE = 64 << 20
ECHO, SINK = 1, 0                 # carried in the header's sender field
OFFER_WINDOW = 16                 # bandwidth messages the server keeps a buffer offered for
TIMEOUT = 60.0

# A transport is a module with Listener(host, port, timeout) -> .accept(timeout)/.address/.close()
# and connect(host, port, timeout) -> Connection; picked by name, as RDMAKV_TRANSPORT does.
TRANSPORTS = {"tcp": "rdmakv.transport.tcp", "verbs": "rdmakv.transport.verbs"}


class Transport:
    def __init__(self, name):
        if name not in TRANSPORTS:
            raise SystemExit(f"unknown transport {name!r} (known: {', '.join(TRANSPORTS)})")
        try:
            module = importlib.import_module(TRANSPORTS[name])
        except ImportError as exc:
            raise SystemExit(f"transport {name!r} is not available in this build: {exc}") from None
        if name == "verbs":
            from rdmakv.transport.verbs import devices as verbs_devices
            usable, reason = verbs_devices.probe()
            if not usable:
                raise SystemExit(f"bench_transport: cannot use verbs: {reason}")
        self.name = name
        self.listen = module.Listener
        self.connect = module.connect


def sizes(quick):
    if quick:
        return [8, 4096, 65536, 1 << 20]
    return [1 << k for k in range(3, 27)]       # 8 B .. 64 MiB


# ---- server --------------------------------------------------------------------
def serve(transport, host, port, once=True):
    listener = transport.listen(host, port, TIMEOUT)
    print(f"LISTENING {listener.address[1]}", flush=True)
    try:
        while True:
            connection = listener.accept(TIMEOUT * 10)
            if connection is None:
                continue
            try:
                _serve_one(connection)
            finally:
                connection.close()
            if once:
                return
    finally:
        listener.close()


def _serve_one(connection):
    buffer = np.empty(MAX_SIZE, np.uint8)
    while True:
        header = connection.recv_header(TIMEOUT)
        if header is None:
            continue
        if header.length > MAX_SIZE:
            raise SystemExit(f"bench_transport server: message of {header.length} bytes is over {MAX_SIZE}")
        payload = buffer[:header.length]
        if header.length:
            connection.recv_payload(header, payload)
        if header.op == Op.PUSH:
            if header.sender == ECHO:
                connection.send(protocol.pack(Op.RESULT, length=header.length), payload)
            elif connection.features.places:
                connection.offer(protocol.tag(Op.PUSH, header.key, 0, header.round + OFFER_WINDOW), payload)
        elif header.op == Op.BARRIER:
            size = header.key         # a bandwidth run of messages of this size starts
            if size and connection.features.places:
                if size > MAX_SIZE:
                    raise SystemExit(f"bench_transport server: messages of {size} bytes are over {MAX_SIZE}")
                for seq in range(OFFER_WINDOW):
                    connection.offer(protocol.tag(Op.PUSH, seq, 0, seq), buffer[:size])
            connection.send(protocol.pack(Op.BARRIER_DONE))
        elif header.op == Op.GOODBYE:
            return


# ---- client --------------------------------------------------------------------
class Client:
    def __init__(self, connection):
        self.c = connection
        self.out = np.ones(MAX_SIZE, np.uint8)
        self.into = np.empty(MAX_SIZE, np.uint8)

    def _expect(self, op):
        header = self.c.recv_header(TIMEOUT)
        if header is None or header.op != op:
            raise RuntimeError(f"expected {protocol.op_name(op)}, got {header}")
        return header

    def sync(self, bandwidth_size=0):
        self.c.send(protocol.pack(Op.BARRIER, key=bandwidth_size))
        self._expect(Op.BARRIER_DONE)

    def bandwidth(self, size, count):
        payload = self.out[:size]
        self.sync(size)
        start = time.perf_counter()
        for seq in range(count):
            self.c.send(protocol.pack(Op.PUSH, length=size, key=seq % OFFER_WINDOW, round=seq, sender=SINK),
                        payload)
        self.sync()
        return time.perf_counter() - start

    def pingpong(self, size, count):
        header, payload, into = protocol.pack(Op.PUSH, length=size, sender=ECHO), self.out[:size], self.into[:size]
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            self.c.send(header, payload)
            reply = self._expect(Op.RESULT)
            if reply.length:
                self.c.recv_payload(reply, into)
            samples.append(time.perf_counter() - start)
        return samples

    def close(self):
        try:
            self.c.send(protocol.pack(Op.GOODBYE))
        finally:
            self.c.close()


def counts_for(size, budget_s, quick):
    """Messages per measurement: enough to last about budget_s at a guessed speed."""
    guess_bw, guess_lat = 2e9, 30e-6
    per_message = max(guess_lat, size / guess_bw)
    bw = int(min(200_000, max(4 if quick else 10, budget_s / per_message)))
    lat = int(min(20_000, max(4 if quick else 10, budget_s / (2 * guess_lat + 2 * size / guess_bw))))
    return bw, lat


def run_sweep(client, size_list, budget_s, quick):
    results = []
    client.sync()
    for n, size in enumerate(size_list):
        bw_count, lat_count = counts_for(size, budget_s, quick)
        progress(f"{n + 1}/{len(size_list)} {human(size):>7}: bandwidth x{bw_count}")
        client.bandwidth(size, max(1, bw_count // 10))          # warm-up
        elapsed = client.bandwidth(size, bw_count)
        progress(f"{n + 1}/{len(size_list)} {human(size):>7}: latency x{lat_count}")
        client.pingpong(size, max(1, lat_count // 10))
        half = [s / 2 for s in client.pingpong(size, lat_count)]
        half.sort()
        results.append({
            "bytes": size, "bw_messages": bw_count, "lat_messages": lat_count,
            "bw_seconds": elapsed,
            "gb_per_s": size * bw_count / elapsed / 1e9,
            "gbit_per_s": size * bw_count * 8 / elapsed / 1e9,
            "msg_per_s": bw_count / elapsed,
            "lat_us_p50": statistics.median(half) * 1e6,
            "lat_us_p99": half[min(len(half) - 1, int(0.99 * len(half)))] * 1e6,
            "lat_us_min": half[0] * 1e6,
        })
    progress_done()
    return results


_progress_width = 0


def progress(text):
    global _progress_width
    line = f"[bench_transport] {text}"
    if sys.stderr.isatty():       # one line, rewritten in place
        sys.stderr.write("\r" + line.ljust(_progress_width))
        _progress_width = len(line)
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def progress_done():
    if not _progress_width:
        return
    sys.stderr.write("\r" + " " * _progress_width + "\r")
    sys.stderr.flush()


def human(n):
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def format_table(report):
    rows = [["size", "GB/s", "Gbit/s", "Mmsg/s", "lat p50 us", "lat p99 us"]]
    for r in report["results"]:
        rows.append([human(r["bytes"]), f"{r['gb_per_s']:.3f}", f"{r['gbit_per_s']:.2f}",
                     f"{r['msg_per_s'] / 1e6:.4f}", f"{r['lat_us_p50']:.1f}", f"{r['lat_us_p99']:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"transport {report['transport']} to {report['peer']}, load average "
             f"{report['loadavg_start'][0]:.2f} at start, {report['loadavg_end'][0]:.2f} at end"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [r["bytes"] for r in report["results"]]
    fig, (bw, lat) = plt.subplots(1, 2, figsize=(10, 4))
    bw.plot(xs, [r["gbit_per_s"] for r in report["results"]], marker="o")
    bw.set_xscale("log", base=2)
    bw.set_xlabel("message size (bytes)")
    bw.set_ylabel("Gbit/s")
    bw.set_title("bandwidth (stream)")
    lat.plot(xs, [r["lat_us_p50"] for r in report["results"]], marker="o", label="p50")
    lat.plot(xs, [r["lat_us_p99"] for r in report["results"]], marker="x", label="p99")
    lat.set_xscale("log", base=2)
    lat.set_yscale("log")
    lat.set_xlabel("message size (bytes)")
    lat.set_ylabel("half round trip (us)")
    lat.set_title("latency (ping-pong)")
    lat.legend()
    fig.suptitle(f"rdmakv {report['transport']} transport, {report['peer']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", default="tcp", help="transport by name: " + ", ".join(TRANSPORTS))
    p.add_argument("--quick", action="store_true", help="4 sizes, a few messages each")
    p.add_argument("--sizes", help="comma-separated message sizes in bytes (default 8 B .. 64 MiB, powers of 2)")
    p.add_argument("--seconds", type=float, default=None, help="time budget per size and test")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    p.add_argument("--serve", action="store_true", help="run only the server side")
    p.add_argument("--host", default="127.0.0.1", help="address the server listens on")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--connect", metavar="HOST:PORT", help="run only the client side, against a --serve")
    args = p.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install 'rdmakv[bench]' (or pip install matplotlib)")
    transport = Transport(args.transport)
    if args.serve:
        serve(transport, args.host, args.port, once=args.port == 0)
        return 0
    size_list = [int(s) for s in args.sizes.split(",")] if args.sizes else sizes(args.quick)
    if max(size_list) > MAX_SIZE or min(size_list) < 0:
        p.error(f"sizes must be within 0 .. {MAX_SIZE}")
    budget = args.seconds if args.seconds is not None else (0.02 if args.quick else 0.25)
    child = None
    if args.connect:
        host, _, port = args.connect.rpartition(":")
    else:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", "--transport",
                                  args.transport, "--host", args.host],
                                 stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO))
        line = child.stdout.readline().decode()
        if not line.startswith("LISTENING "):
            child.kill()
            raise SystemExit(f"bench_transport: the server did not start ({line!r})")
        host, port = args.host, line.split()[1]
    report = {"transport": args.transport, "peer": f"{host}:{port}", "loadavg_start": loadavg(),
              "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    client = Client(transport.connect(host, int(port), TIMEOUT))
    try:
        report["results"] = run_sweep(client, size_list, budget, args.quick)
    finally:
        client.close()
        if child is not None:
            child.wait(30)
    report["loadavg_end"] = loadavg()
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
