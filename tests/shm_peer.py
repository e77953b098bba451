"""The far end of the shared-memory transport tests, in its own process.

    python tests/shm_peer.py echo|mute  PORT-FILE

Listens on 127.0.0.1 (shared memory forced), writes "port pid" to PORT-FILE,
accepts one connection, then `echo` sends every frame back as it came (header
and payload) until the peer leaves, and `mute` never reads (so a sender fills
the ring and blocks)."""
import os
import sys
import time

from rdmakv.core.errors import ConnectionClosed
from rdmakv.transport import shm, tcp


def main(mode, port_file):
    listener = shm.over(tcp, forced=True).Listener("127.0.0.1", 0, 30)
    with open(port_file + ".tmp", "w") as out:
        out.write(f"{listener.address[1]} {os.getpid()}\n")
    os.rename(port_file + ".tmp", port_file)
    connection = None
    deadline = time.monotonic() + 30
    while connection is None and time.monotonic() < deadline:
        connection = listener.accept(1.0)
    listener.close()
    if connection is None:
        return 2
    print(type(connection).__name__, connection.peer, flush=True)
    if mode == "mute":
        time.sleep(60)
        return 0
    try:
        while True:
            header = connection.recv_header(1.0)
            if header is None:
                continue
            payload = bytearray(header.length)
            if header.length:
                connection.recv_payload(header, payload)
            connection.send(bytes(connection._header), payload if header.length else None)
    except ConnectionClosed:
        pass
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
