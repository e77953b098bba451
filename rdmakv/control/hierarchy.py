"""One push per host (RDMAKV_HIERARCHY): who sums with whom, decided once by
the scheduler at the join.

A host is a kernel and a network namespace (netif.host_identity), as for
shared memory: the workers that share one can share memory.  Where a host
has two or more workers and some server is on another host, its lowest rank
is the host's local root.  For every server on another host, the other
workers add their push of a plain pushpull into the host's sum (shared
memory, rdmakv/worker/host_sums.py, _shm.h) and send that server only the
header, flagged VIA_HOST; the root adds its own once all of theirs are in,
pushes the host's sum, and writes the result back where they copy it out
(rdmakv/native/worker_engine.c).  The servers count every worker's push as
before (round, dtype, who pushed, a departed worker), and answer a VIA_HOST
push with a header only.  Broadcasts, pulls and asynchronous mode go as
before.

It needs every node's native data path: each node's HELLO says why it cannot
take part (`refusal`), and one such node turns it off for the whole job,
with a log line naming it."""
import logging
import secrets

from rdmakv.transport.shm import settings

log = logging.getLogger("rdmakv.hierarchy")


def refusal(config, native_possible):
    """Why this node cannot take part in one push per host, or None."""
    if not config.hierarchy:
        return "RDMAKV_HIERARCHY=0"
    if settings.forbidden():
        return "RDMAKV_SHM=0 forbids shared memory"
    if config.mode != "sync":
        return "asynchronous mode (RDMAKV_MODE=async) applies each push on its own"
    if not native_possible:
        return "it runs the Python data path (RDMAKV_ENGINE=python, RDMAKV_INTEGRITY or a trace)"
    return None


def plan(workers, servers):
    """The job's hierarchy from the nodes' HELLOs ({rank: info} each, info with
    host, host_id and hierarchy, the node's refusal): {worker rank: its part}
    for the workers of hosts that take part, or {} (logged: why not)."""
    refusals = [(f"{role} {rank}", info.get("hierarchy", "it did not say")) for role, nodes in
                (("worker", workers), ("server", servers)) for rank, info in sorted(nodes.items())]
    refused = [(name, why) for name, why in refusals if why is not None]
    if refused:
        if refused[0][1] != "RDMAKV_HIERARCHY=0":
            log.info("one push per host is off: %s: %s", *refused[0])
        return {}
    hosts = {}
    for rank, info in sorted(workers.items()):
        hosts.setdefault(info["host_id"], []).append(rank)
    parts = {}
    for host_id, ranks in hosts.items():
        remote = [rank for rank, info in sorted(servers.items()) if info["host_id"] != host_id]
        if len(ranks) < 2 or not remote:
            continue
        token = secrets.token_hex(16)
        root = ranks[0]
        for rank in ranks:
            parts[rank] = {"root": root, "workers": ranks, "host": workers[root]["host"], "token": token,
                           "remote_servers": remote}
    if parts:
        log.info("one push per host: %s", "; ".join(
            f"host {part['host']}: root worker {root}, workers {part['workers']}"
            for root, part in sorted(parts.items()) if part["root"] == root))
    return parts


def worker_name(rank, roots):
    """How errors name worker rank, given {root rank: its host}."""
    if rank in roots:
        return f"worker {rank} (the local root of host {roots[rank]})"
    return f"worker {rank}"


def roots_of(parts):
    """{root rank: its host} of a plan."""
    return {part["root"]: part["host"] for part in parts.values()}
