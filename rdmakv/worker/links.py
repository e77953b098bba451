"""What a worker does with one server on either data path: its control
requests (SET_OPTIMIZER, GET_STATES, ...) and their answers, and the
server's other control messages (ERROR, WAITING)."""
from __future__ import annotations

import threading
from collections import deque

from rdmakv.core import netif, protocol
from rdmakv.core.errors import PeerTimeout, ProtocolError, RemoteError
from rdmakv.core.protocol import Op

# Chunks this small take no credit and, on the Python path, are sent by the
# calling thread when nothing is queued ahead of them; the native engine sends
# them in batches (its small_bytes).
DIRECT_SEND_BYTES = 64 * 1024

class ServerLinkBase:
    """One server: its control requests and answers.  Subclasses (ServerLink,
    EngineLink) move the data and define send() and note_missing()."""

    def __init__(self, store, rank, address):
        self.store = store
        self.rank = rank
        self.address = address
        self.replies = deque()        # control answers (ACK/STATES/ERROR) to a waiting request
        self.replied = threading.Condition()
        self.error = None

    def describe(self):
        return f"server {self.rank} at {netif.format_address(*self.address)}"

    def send_json(self, op, obj, **fields):
        self.send(op, protocol.encode_json(obj), **fields)

    def on_control(self, header, payload):
        """A message from the server other than a result or a credit return."""
        if header.op == Op.ERROR:
            obj = protocol.decode_json(payload or b"")
            message = protocol.peer_text(obj)
            if obj.get("fatal") is True:
                self.store.job_failed(RemoteError(message))
            elif isinstance(obj.get("key"), int):
                self.store.key_failed(obj["key"], RemoteError(message))
            else:
                with self.replied:
                    self.replies.append(RemoteError(message))
                    self.replied.notify_all()
        elif header.op == Op.WAITING:
            # The server still waits for these workers' pushes: named if this round times out.
            missing = protocol.decode_json(payload or b"").get("missing")
            missing = [rank for rank in missing if type(rank) is int and 0 <= rank < self.store.num_workers] \
                if isinstance(missing, list) else []
            self.note_missing(header, missing)
        elif header.op in (Op.ACK, Op.STATES):
            with self.replied:
                self.replies.append(bytes(payload or b""))
                self.replied.notify_all()
        else:
            raise ProtocolError(f"unexpected {protocol.op_name(header.op)} from {self.describe()}")

    def request(self, op, payload, timeout):
        """Send a control request and wait for its ACK/STATES answer."""
        with self.replied:
            self.replies.clear()
        self.send(op, payload)
        with self.replied:
            if not self.replied.wait_for(lambda: self.replies or self.error, timeout):
                raise PeerTimeout(f"{self.describe()} did not answer {protocol.op_name(op)} within {timeout:g} s")
            if self.error is not None:
                raise self.error
            answer = self.replies.popleft()
        if isinstance(answer, Exception):
            raise answer
        return answer


def describe_owing(links, handle):
    """Which servers still owe results for handle, and for which chunks (for a timeout's message)."""
    owing = []
    for link in links:
        entries = link.owed(handle)
        if entries:
            chunks = sorted(index for index, _ in entries)
            shown = ", ".join(map(str, chunks[:8])) + (", ..." if len(chunks) > 8 else "")
            missing = sorted({rank for _, ranks in entries for rank in ranks or ()})
            blame = ""
            if missing:
                who = ", ".join(f"worker {rank}" for rank in missing)
                blame = f"; it has not received the push of {who} for this round"
            owing.append(f"{link.describe()} (chunks {shown}{blame})")
    return owing
