"""Joining a cluster: every worker and server connects to the scheduler,
says HELLO, and receives its rank and the address book in WELCOME."""
import functools
import socket
import threading
import time

from rdmakv import auth, netif, protocol
from rdmakv.errors import PeerTimeout, ProtocolError, RemoteError
from rdmakv.protocol import Op
from rdmakv.transport.base import Handler, Peer


def accept_peers(listener, handler, secret, timeout, running, label, silence_limit=None, integrity=False):
    """Accept connections while running() is true; each becomes a Peer whose reader
    thread authenticates it before anything else is read (and, with silence_limit,
    drops it once it has been silent that long: see Peer)."""
    handshake = functools.partial(auth.accept, secret=secret, timeout=timeout, integrity=integrity)
    while running():
        try:
            connection = listener.accept(1.0)
        except OSError:
            return
        if connection is not None:
            Peer(connection, handler, f"{label} at {connection.peer}", handshake, silence_limit).start()


class ControlLink(Handler):
    """A node's connection to the scheduler.  After WELCOME, every control
    message goes to on_control(header, obj) and a lost link to on_lost(error)."""

    def __init__(self, config, transport, role, on_control, on_lost):
        from rdmakv.transport import tcp
        self.config = config
        self.transport = tcp            # the scheduler always speaks TCP; `transport` is for data
        self.role = role
        self.on_control = on_control
        self.on_lost = on_lost
        self.welcome = None
        self._welcomed = threading.Event()
        self._refusal = None
        self.peer = None

    def join(self, host, port, worker_id=None):
        """Register with the scheduler and return the WELCOME it answers."""
        config = self.config
        where = netif.format_address(config.scheduler_host, config.scheduler_port)
        deadline = time.monotonic() + config.timeout
        connection = auth.open_connection(self.transport, config.scheduler_host, config.scheduler_port,
                                          auth.load_secret(config), config.timeout, retry_until=deadline,
                                          integrity=config.integrity)
        # Heartbeats both ways: a stopped or hung scheduler is noticed within RDMAKV_TIMEOUT.
        self.peer = Peer(connection, self, f"the scheduler at {where}", silence_limit=config.timeout).start()
        self.peer.send_json(Op.HELLO, {
            "role": self.role, "host": host, "port": port, "worker_id": worker_id,
            "hostname": socket.gethostname(), "version": protocol.VERSION,
        })
        if not self._welcomed.wait(max(0.0, deadline - time.monotonic())):
            self.close()
            raise PeerTimeout(
                f"the scheduler at {where} did not complete the rendezvous within {config.timeout:g} s "
                f"(RDMAKV_TIMEOUT): are all {config.num_workers} workers and {config.num_servers} servers started "
                f"with the same DMLC_PS_ROOT_URI/PORT?")
        if self._refusal:
            self.close()
            raise RemoteError(f"the scheduler at {where} refused this {self.role}: {self._refusal}")
        return self.welcome

    def send(self, op, obj=None, **fields):
        self.peer.send_json(op, obj or {}, **fields)

    def on_message(self, peer, header, payload):
        obj = protocol.decode_json(payload or b"{}")
        if not self._welcomed.is_set():
            if header.op == Op.WELCOME:
                self.welcome = obj
            elif header.op == Op.ERROR:
                self._refusal = protocol.peer_text(obj)
            else:
                raise ProtocolError(f"expected WELCOME from the scheduler, got {protocol.op_name(header.op)}")
            self._welcomed.set()
            return
        self.on_control(header, obj)

    def on_closed(self, peer, error):
        if not self._welcomed.is_set():
            self._refusal = f"the connection closed during the rendezvous ({error})"
            self._welcomed.set()
        elif error is not None:
            self.on_lost(error)

    def close(self):
        if self.peer is not None:
            self.peer.close()
