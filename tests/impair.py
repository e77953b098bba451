"""A packet impairer for kernels without sch_netem: run inside the router
namespace of tests/netns.py, it opens a TUN device, and every packet the
router's policy rules steer into it comes back out of the same device after
netem-style treatment (delay with jitter, loss, duplication, reordering), to be
routed on to its destination.  Real packets of real TCP connections between
real network namespaces; only the qdisc is replaced.

    python tests/impair.py TUN --delay-ms 20 --jitter-ms 5 --loss 1 --duplicate 1 --reorder 5 --stats FILE

Percentages as netem takes them.  Reordering follows netem: a packet picked for
reordering leaves at once, ahead of the delayed ones.  SIGTERM writes the
counters (JSON) to --stats and exits."""
import argparse
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("tun")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--duplicate", type=float, default=0.0)
    parser.add_argument("--reorder", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--ready", help="file created once the device exists")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    fd = open_tun(args.tun)
    counts = {"packets": 0, "dropped": 0, "duplicated": 0, "reordered": 0, "delivered": 0}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    if args.ready:
        open(args.ready, "w").close()

    pending = []                 # (release time, sequence, packet)
    sequence = 0
    while not stopping:
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, packet = heapq.heappop(pending)
            try:
                os.write(fd, packet)
                counts["delivered"] += 1
            except OSError:
                pass             # the router has no route for it right now: like a drop
        wait = min(0.2, pending[0][0] - now) if pending else 0.2
        try:
            readable, _, _ = select.select([fd], [], [], max(0.0, wait))
        except InterruptedError:
            continue
        if not readable:
            continue
        for _ in range(256):
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                break
            counts["packets"] += 1
            if rng.random() * 100 < args.loss:
                counts["dropped"] += 1
                continue
            copies = 2 if rng.random() * 100 < args.duplicate else 1
            counts["duplicated"] += copies - 1
            now = time.monotonic()
            for _ in range(copies):
                if rng.random() * 100 < args.reorder:
                    counts["reordered"] += 1
                    release = now
                else:
                    release = now + max(0.0, rng.gauss(args.delay_ms, args.jitter_ms)) / 1000
                sequence += 1
                heapq.heappush(pending, (release, sequence, packet))
    with open(args.stats, "w") as out:
        json.dump(counts, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
