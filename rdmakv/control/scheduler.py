"""The scheduler: joining (every node registers, then learns the others),
barriers and orderly shutdown.  It moves no tensor data.  A node that
disconnects before saying GOODBYE fails the job: every other node is told
which one died, so nobody waits forever."""
import logging
import threading
import time

from rdmakv.control import auth, hierarchy
from rdmakv.control.node import accept_peers
from rdmakv.control.peer import Handler
from rdmakv.core import netif, protocol
from rdmakv.core.errors import PeerTimeout, ProtocolError
from rdmakv.core.protocol import Op
from rdmakv.transport import choose_transport

log = logging.getLogger("rdmakv.scheduler")


class Scheduler(Handler):
    def __init__(self, config):
        self.config = config
        self.transport, _ = choose_transport("tcp")       # control traffic always uses TCP
        self.listener = self.transport.Listener(config.scheduler_host, config.scheduler_port, config.timeout)
        self.address = netif.format_address(*self.listener.address)
        self.secret = auth.load_secret(config)
        if self.secret is None:
            log.warning("no RDMAKV_SECRET: this cluster is unauthenticated; anyone who can reach %s can join",
                        self.address)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending = []            # peers that said HELLO before everyone arrived
        self._workers = {}            # rank -> peer
        self._servers = {}
        self._goodbyes = set()
        self._barriers = {}           # barrier number -> set of worker ranks
        self._failure = None
        self._started = False
        self._closing = False

    # ---- lifecycle -------------------------------------------------------
    def run(self):
        """Serve until every worker said GOODBYE (0) or the job failed (1)."""
        acceptor = threading.Thread(target=self._accept_loop, name="rdmakv-accept", daemon=True)
        acceptor.start()
        log.info("scheduler listening on %s for %d workers and %d servers",
                 self.address, self.config.num_workers, self.config.num_servers)
        try:
            self._join()
            with self._lock:
                while self._failure is None and len(self._goodbyes) < self.config.num_workers:
                    self._changed.wait(1.0)
                failure = self._failure
                servers = list(self._servers.values())
            if failure is None:
                for peer in servers:
                    peer.info["told_to_shut_down"] = True
                    self._send(peer, Op.SHUTDOWN, {})
                self._wait_for_disconnects(servers)
                with self._lock:
                    failure = self._failure
            if failure is None:
                log.info("all workers finished; servers told to shut down")
                return 0
            # Tell every node that is still there before close() drops their connections:
            # done here, not in the dead peer's reader thread, so the news cannot lose that race.
            with self._lock:
                others = [p for p in self._pending if not p.info.get("gone")]
            for other in others:
                self._send(other, Op.ERROR, {"message": failure})
            log.error("job failed: %s", failure)
            return 1
        finally:
            self.close()

    def _join(self):
        deadline = time.monotonic() + self.config.timeout
        total = self.config.num_workers + self.config.num_servers
        with self._lock:
            while self._failure is None and len(self._pending) < total:
                if not self._changed.wait(max(0.0, min(1.0, deadline - time.monotonic()))):
                    if time.monotonic() >= deadline:
                        roles = [p.info["role"] for p in self._pending]
                        message = (f"joining timed out after {self.config.timeout:g} s: "
                                   f"{roles.count('worker')}/{self.config.num_workers} workers and "
                                   f"{roles.count('server')}/{self.config.num_servers} servers registered")
                        self._failure = message
                        for peer in self._pending:
                            self._send(peer, Op.ERROR, {"message": message})
                        raise PeerTimeout(message)
            if self._failure is not None:
                return
            self._assign_ranks()
            self._failure = self._modes_disagree()    # run() tells every node
            if self._failure is not None:
                return
            self._started = True
            servers = [[self._servers[r].info["host"], self._servers[r].info["port"]]
                       for r in range(self.config.num_servers)]
            parts = hierarchy.plan({r: p.info for r, p in self._workers.items()},
                                   {r: p.info for r, p in self._servers.items()})
            roots = hierarchy.roots_of(parts)
            for rank, peer in self._workers.items():
                peer.name = hierarchy.worker_name(rank, roots)   # the name a failure is told by
            # The workers that push through their host's root, for the servers' checks.
            via_host = sorted(rank for rank, part in parts.items() if part["root"] != rank)
            for rank, peer in self._servers.items():
                self._send(peer, Op.WELCOME, {"rank": rank, "num_workers": self.config.num_workers,
                                              "num_servers": self.config.num_servers,
                                              "via_host": via_host, "roots": sorted(roots.items())})
            for rank, peer in self._workers.items():
                same_host = sorted(r for r, p in self._workers.items()
                                   if p.info["hostname"] == peer.info["hostname"])
                self._send(peer, Op.WELCOME, {
                    "rank": rank, "num_workers": self.config.num_workers,
                    "num_servers": self.config.num_servers, "servers": servers,
                    "local_rank": same_host.index(rank), "local_size": len(same_host),
                    "hierarchy": parts.get(rank)})
        log.info("all nodes joined")

    def _assign_ranks(self):
        for role, ranks, count in (("worker", self._workers, self.config.num_workers),
                                   ("server", self._servers, self.config.num_servers)):
            peers = [p for p in self._pending if p.info["role"] == role]
            chosen = {p.info["node_id"] for p in peers if p.info["node_id"] is not None}
            free = iter(r for r in range(count) if r not in chosen)
            for peer in peers:
                rank = peer.info["node_id"]
                ranks[next(free) if rank is None else rank] = peer
            for rank, peer in ranks.items():
                peer.info["rank"] = rank
                peer.name = f"{role} {rank}"

    def _modes_disagree(self):
        """Why the nodes cannot run one job, if they asked for different modes (RDMAKV_MODE); else None."""
        by_mode = {}
        for peer in sorted(self._pending, key=lambda p: (p.info["role"], p.info["rank"])):
            by_mode.setdefault(peer.info["mode"], []).append(peer.name)
        if len(by_mode) < 2:
            return None
        groups = "; ".join(f"{', '.join(names)} {mode}" for mode, names in sorted(by_mode.items()))
        return (f"the nodes disagree on RDMAKV_MODE ({groups}): set RDMAKV_MODE (KVStore(mode=...), "
                f"mx.kv.create('rdmakv_async')) alike on every worker and server")

    def _accept_loop(self):
        # Heartbeats both ways: a stopped or hung node is noticed within RDMAKV_TIMEOUT.
        accept_peers(self.listener, self, self.secret, self.config.timeout, lambda: not self._closing, "node",
                     silence_limit=self.config.timeout, integrity=self.config.integrity)

    def _wait_for_disconnects(self, peers, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self._lock:
            while any(not p.info.get("gone") for p in peers) and time.monotonic() < deadline:
                self._changed.wait(0.1)

    def close(self):
        self._closing = True
        self.listener.close()
        with self._lock:
            peers = list(self._pending)
        for peer in peers:
            peer.close()

    # ---- messages --------------------------------------------------------
    def _send(self, peer, op, obj, **fields):
        try:
            peer.send_json(op, obj, **fields)
        except Exception as exc:  # the peer's own reader reports the failure
            log.warning("could not send %s to %s: %s", protocol.op_name(op), peer.name, exc)

    def destination(self, peer, header):
        # Nothing is allocated for a peer that has not said HELLO but its small HELLO.
        if "role" not in peer.info and (header.op != Op.HELLO or header.length > protocol.MAX_CONNECT_BYTES):
            raise ProtocolError(f"expected a HELLO of at most {protocol.MAX_CONNECT_BYTES} bytes, got "
                                f"{protocol.op_name(header.op)} of {header.length} bytes")
        return None

    introduction = "accepted HELLO"

    def introduced(self, peer):
        return "role" in peer.info

    def on_message(self, peer, header, payload):
        obj = protocol.decode_json(payload or b"{}")
        if header.op == Op.HELLO:
            self._hello(peer, obj)
        elif "role" not in peer.info:
            raise ProtocolError(f"{protocol.op_name(header.op)} before HELLO")
        elif header.op == Op.BARRIER and peer.info["role"] == "worker":
            self._barrier(peer, header.round)
        elif header.op == Op.GOODBYE and peer.info["role"] == "worker":
            with self._lock:
                self._goodbyes.add(peer.info["rank"])
                peer.info["said_goodbye"] = True
                self._changed.notify_all()
        elif header.op == Op.GOODBYE and peer.info["role"] == "server" and peer.info.get("told_to_shut_down"):
            with self._lock:
                peer.info["said_goodbye"] = True
        elif header.op == Op.ERROR and peer.info["role"] == "worker":
            # A worker leaving a failed job says why, so the others hear the cause.
            with self._lock:
                if self._failure is None:
                    self._failure = f"{peer.name} failed: {protocol.peer_text(obj)}"
                self._changed.notify_all()
        else:
            raise ProtocolError(f"unexpected {protocol.op_name(header.op)} from {peer.name}")

    def _hello(self, peer, obj):
        role = obj.get("role")
        node_id = obj.get("node_id")
        refusal = None
        with self._lock:
            roles = [p.info["role"] for p in self._pending]
            ids = [p.info["node_id"] for p in self._pending if p.info["role"] == role]
            count = self.config.num_workers if role == "worker" else self.config.num_servers
            if "role" in peer.info:
                refusal = "HELLO sent twice"
            elif obj.get("version") != protocol.VERSION:
                refusal = f"protocol version {obj.get('version')} != {protocol.VERSION}"
            elif role not in ("worker", "server"):
                refusal = f"unknown role {role!r}"
            elif not isinstance(obj.get("host"), str) or not isinstance(obj.get("port"), int):
                refusal = "HELLO without a host and port"
            elif self._started:
                refusal = "the cluster has already started"
            elif role == "worker" and roles.count("worker") >= self.config.num_workers:
                refusal = f"the cluster already has its {self.config.num_workers} workers (DMLC_NUM_WORKER)"
            elif role == "server" and roles.count("server") >= self.config.num_servers:
                refusal = f"the cluster already has its {self.config.num_servers} servers (DMLC_NUM_SERVER)"
            elif node_id is not None and (not isinstance(node_id, int) or isinstance(node_id, bool)
                                          or not 0 <= node_id < count):
                refusal = f"{role} id {node_id!r} is outside 0..{count - 1}"
            elif node_id is not None and node_id in ids:
                refusal = f"{role} id {node_id} is already taken"
            elif obj.get("mode", "sync") not in ("sync", "async"):
                refusal = f"unknown mode {obj.get('mode')!r} (RDMAKV_MODE)"
            if refusal is None:
                peer.info.update(role=role, host=obj["host"], port=obj["port"], node_id=node_id,
                                 hostname=str(obj.get("hostname", "")), mode=obj.get("mode", "sync"),
                                 host_id=str(obj.get("host_id", "")),
                                 hierarchy=obj.get("hierarchy") if "hierarchy" in obj else "no hierarchy in its HELLO")
                peer.name = f"{role} at {peer.connection.peer}"
                self._pending.append(peer)
                self._changed.notify_all()
        if refusal is not None:
            log.warning("refused %s: %s", peer.connection.peer, refusal)
            self._send(peer, Op.ERROR, {"message": refusal})

    def _barrier(self, peer, number):
        with self._lock:
            arrived = self._barriers.setdefault(number, set())
            arrived.add(peer.info["rank"])
            if len(arrived) < self.config.num_workers:
                return
            del self._barriers[number]
            workers = list(self._workers.values())
        for worker in workers:
            self._send(worker, Op.BARRIER_DONE, {}, round=number)

    def on_closed(self, peer, error):
        with self._lock:
            peer.info["gone"] = True
            role = peer.info.get("role")
            # A server too says GOODBYE, in answer to SHUTDOWN: one that vanished first (killed
            # as the last workers finished) fails the job, whatever order the news came in.
            orderly = peer.info.get("said_goodbye") or self._closing
            if role is not None and not orderly and self._failure is None:
                # run() wakes up and tells every other node which peer died.
                if isinstance(error, PeerTimeout):
                    self._failure = str(error)        # it names the silent peer
                else:
                    self._failure = f"{peer.name} disconnected unexpectedly ({error or 'connection closed'})"
            if peer in self._pending and not self._started:
                self._pending.remove(peer)
            self._changed.notify_all()
