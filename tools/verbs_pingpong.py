#!/usr/bin/env python3
"""Where the time of a small verbs message goes: a raw SEND/RECV ping-pong
between two RC QPs of this process, over rdmakv's verbs bindings with none of
the transport around them.

    python tools/verbs_pingpong.py [--size 1024] [--count 200]

Three ways of waiting, each printed as one-way latency (half a round trip):
- one thread busy-polls both CQs (the floor for Python on this device);
- one thread per side, each sleeping on its completion channel after a 30 us
  spin, as the transport's progress threads do;
- one thread per side, each spinning without sleeping.
On soft-RoCE under emulation the second is dominated by the device's own
deferred kernel work and the wake-up, and the third shows what spinning on
every core does to it: the gap between these and the first is not ours to
close in Python."""
import argparse
import threading
import time

import numpy as np

from rdmakv.native import transport as t
from rdmakv.transport.verbs import devices as verbs_devices, qp as verbs_qp

RECV_ID, SEND_ID = 1, 2
WAIT_SECONDS = 10.0


class Side:
    def __init__(self, ctx, port, size):
        self.pd = t.PD(ctx)
        self.channel = t.CompChannel(ctx)
        self.cq = t.CQ(ctx, 16, self.channel)
        self.qp = t.QP(self.pd, self.cq, max_send_wr=4, max_recv_wr=4)
        self.psn = verbs_qp.new_psn()
        self.endpoint = verbs_qp.local_endpoint(self.qp, port, self.psn)
        self.buffer = np.zeros(2 * size, np.uint8)
        self.mr = t.MR(self.pd, self.buffer, t.IBV_ACCESS_LOCAL_WRITE)
        self.size = size

    def post_recv(self):
        self.qp.post_recv(self.mr, self.size, self.size, wr_id=RECV_ID)

    def post_send(self):
        self.qp.post_send(self.mr, 0, self.size, wr_id=SEND_ID, inline=False)

    def wait(self, count, spin_us):
        """Wait for `count` completions."""
        seen = 0
        while seen < count:
            wcs = self.cq.wait(WAIT_SECONDS, max_entries=4, spin_us=spin_us)
            if not wcs:
                raise SystemExit(f"no completion within {WAIT_SECONDS:g} s")
            seen += len(wcs)

    def close(self):
        self.cq.close()
        self.pd.close()
        self.channel.close()


def one_thread(a, b, count):
    start = time.perf_counter()
    for _ in range(count):
        b.post_recv()
        a.post_recv()
        a.post_send()
        b.wait(1, 1e9)          # a's message arrived
        b.post_send()
        a.wait(2, 1e9)          # a's send done, b's answer arrived
        b.wait(1, 1e9)          # b's send done
    return time.perf_counter() - start


def two_threads(a, b, count, spin_us):
    def answer():
        for _ in range(count):
            b.post_recv()
            b.wait(1, spin_us)
            b.post_send()
            b.wait(1, spin_us)

    responder = threading.Thread(target=answer)
    start = time.perf_counter()
    responder.start()
    for _ in range(count):
        a.post_recv()
        a.post_send()
        a.wait(2, spin_us)
    responder.join(WAIT_SECONDS)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--count", type=int, default=200)
    args = p.parse_args()
    usable, reason = verbs_devices.probe()
    if not usable:
        raise SystemExit(f"verbs_pingpong: cannot use verbs: {reason}")
    ctx, port = verbs_devices.open_device()
    a, b = Side(ctx, port, args.size), Side(ctx, port, args.size)
    try:
        verbs_qp.connect_rc(a.qp, port, b.endpoint, a.psn)
        verbs_qp.connect_rc(b.qp, port, a.endpoint, b.psn)
        runs = [("one thread busy-polls both CQs", one_thread(a, b, args.count)),
                ("a thread per side, 30 us spin then channel sleep", two_threads(a, b, args.count, 30.0)),
                ("a thread per side, spinning only", two_threads(a, b, args.count, 1e9))]
        print(f"raw verbs ping-pong on {ctx.name}, {args.size} B SEND/RECV, {args.count} round trips")
        for name, seconds in runs:
            print(f"  {name:50s} {seconds / args.count / 2 * 1e6:8.0f} us one-way")
    finally:
        a.close()
        b.close()
        ctx.close()


if __name__ == "__main__":
    main()
