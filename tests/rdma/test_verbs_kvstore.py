"""KVStore over verbs with a real local cluster in the soft-RoCE VM: the
scheduler on TCP, servers and workers on RDMAKV_TRANSPORT=verbs."""
import ipaddress
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import rdmakv

from kvstore_helpers import expected_sum, pushpull_keys_at_once, worker_values
from rdmakv.transport.verbs import devices as verbs_devices

USABLE, REASON = verbs_devices.probe()
pytestmark = [pytest.mark.rdma, pytest.mark.skipif(not USABLE, reason=f"no usable RDMA device: {REASON}")]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int32", "int64"]


@pytest.fixture(params=["native", "python"])
def data_path(request):
    """The data path the whole job runs (RDMAKV_ENGINE): native engines over verbs
    streams (verbs/stream.py), or Python threads over VerbsConnection."""
    return request.param


@pytest.fixture
def verbs_cluster(cluster_factory, monkeypatch, data_path):
    monkeypatch.setenv("RDMAKV_TRANSPORT", "verbs")
    monkeypatch.setenv("RDMAKV_ENGINE", data_path)

    def make(workers, servers, **env):
        # Python under TCG starts slowly: give the rendezvous more than the default 30 s.
        cluster = cluster_factory(workers, servers, **{"RDMAKV_TIMEOUT": 120, **env})
        cluster.connect()
        for kv in cluster.stores:
            assert (kv._engine is not None) == (data_path == "native")
        return cluster
    return make


def test_exact_sums_every_dtype_multichunk(verbs_cluster):
    cluster = verbs_cluster(2, 2, RDMAKV_PARTITION_BYTES=32768)

    def work(kv):
        from rdmakv.transport import verbs
        assert kv.transport is verbs
        for dtype in DTYPES:
            for shape in [(1,), (3, 5), (40_000,), (300, 257)]:      # up to 8 chunks of 32 KiB
                value = worker_values(kv.rank, shape, dtype)
                kv.pushpull(f"{dtype}{shape}", value)
                np.testing.assert_array_equal(value, expected_sum(2, shape, dtype))
        return True

    assert cluster.run(work, timeout=240) == [True, True]


def test_many_keys_priorities_and_broadcast(verbs_cluster):
    cluster = verbs_cluster(2, 2, RDMAKV_PARTITION_BYTES=65536, RDMAKV_SCHEDULING_CREDIT=2)
    shapes = [((n * 7919) % 50_000 + 1,) for n in range(24)]

    def work(kv):
        pushpull_keys_at_once(kv, shapes, 2)
        weights = np.arange(200_000, dtype=np.float32) * (kv.rank + 1)
        kv.broadcast("w", weights, root=0)
        np.testing.assert_array_equal(weights, np.arange(200_000, dtype=np.float32))
        kv.barrier()
        return True

    assert cluster.run(work, timeout=240) == [True, True]


@pytest.mark.parametrize("data_path", ["python"])
def test_16mib_pushpull_is_zero_copy(verbs_cluster):
    """The Python data path's verbs connections move large payloads without a copy
    (a native engine's stream copies them through its rings: stream.py)."""
    cluster = verbs_cluster(2, 1)
    n = 4 << 20                       # float32: 16 MiB, four 4 MiB chunks
    rounds = 3

    def work(kv):
        value = np.empty(n, np.float32)
        for _ in range(rounds):
            value[:] = kv.rank + 1
            kv.pushpull("big", value)
            np.testing.assert_array_equal(value, np.full(n, 3, np.float32))
        connections = [link.peer.connection for link in kv._links]
        return [sum(getattr(c, counter) for c in connections)
                for counter in ("copied_bytes", "rendezvous_bytes", "placed_bytes")]

    for copied, rendezvous, placed in cluster.run(work, timeout=240):
        # Every result, and every push after the first (which may overtake the
        # server's first offer), is written straight into the buffer offered for it.
        assert placed + rendezvous == rounds * 2 * 16 << 20
        assert placed >= (2 * rounds - 1) * 16 << 20
        assert copied < 64 << 10, f"{copied} bytes went through bounce slots"


@pytest.mark.parametrize("data_path", ["native"])
def test_the_engines_move_large_chunks_without_a_copy(verbs_cluster):
    """On the native engines, a chunk of 64 KiB or more is RDMA-written from the
    caller's array into the server's ring and its result straight into `out`
    (stream.py): the worker copies only headers and small messages, and the
    sums stay exact with the result in place, in a separate `out`, and from a
    read-only source."""
    cluster = verbs_cluster(2, 1, RDMAKV_PARTITION_BYTES=1 << 20)
    n = 1 << 20                       # int32: 4 MiB, four 1 MiB chunks
    rounds = 3

    def work(kv):
        value = np.empty(n, np.int32)
        out = np.empty(n, np.int32)
        for step in range(rounds):
            value[:] = np.arange(n, dtype=np.int32) * (kv.rank + 1) + step
            kv.pushpull("in place", value)
            np.testing.assert_array_equal(value, np.arange(n, dtype=np.int32) * 3 + 2 * step)
            source = np.arange(n, dtype=np.int32) + kv.rank
            source.setflags(write=False)
            kv.pushpull("separate out", source, out=out)
            np.testing.assert_array_equal(out, np.arange(n, dtype=np.int32) * 2 + 1)
        connections = [link.connection for link in kv._links]
        return sum(c.copied_bytes for c in connections), sum(c.placed_bytes for c in connections)

    for copied, placed in cluster.run(work, timeout=240):
        assert placed == 2 * rounds * 4 << 20, "every push leaves from the caller's array"
        assert copied < 256 << 10, f"{copied} bytes were copied: results should have come placed"


def test_verbs_workers_of_a_server_that_also_shares_memory(cluster_factory):
    """The server runs `auto`: shared memory layered over verbs, its round
    buffers in memory it could share with co-located workers.  These workers
    force verbs, so every result goes out of that memory by RDMA write (the
    Python data path's offers: its placed bytes are counted)."""
    from cluster import run_threads
    cluster = cluster_factory(2, 1, RDMAKV_TRANSPORT="auto", RDMAKV_TIMEOUT=120, RDMAKV_ENGINE="python")
    stores, errors = run_threads([lambda i=i: rdmakv.KVStore(worker_id=i, **cluster.settings(transport="verbs",
                                                                                             engine="python"))
                                  for i in range(2)], timeout=120)
    cluster.stores.extend(store for store in stores if store is not None)
    assert not any(errors), errors
    n = 3 << 18                       # int32: 3 MiB, one chunk

    def work(kv):
        assert kv.transport.__name__.endswith("verbs")
        value = np.empty(n, np.int32)
        for step in range(3):
            value[:] = np.arange(n, dtype=np.int32) * (kv.rank + 1) + step
            kv.pushpull("shared", value)
            np.testing.assert_array_equal(value, np.arange(n, dtype=np.int32) * 3 + 2 * step)
        return sum(link.peer.connection.placed_bytes for link in kv._links)

    for placed in cluster.run(work, timeout=240):
        assert placed >= 5 * n * 4    # all results and the pushes after the first, in place


SCRIPT = """
import numpy as np, rdmakv
from rdmakv.transport import verbs
with rdmakv.KVStore() as kv:
    assert kv.transport is verbs, kv.transport_reason
    x = np.full(300_000, kv.rank + 1, np.int32)
    kv.pushpull("x", x)
    assert (x == 3).all()
    print("launch ok", kv.rank, flush=True)
"""


def test_launch_with_verbs(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, RDMAKV_TRANSPORT="verbs", PYTHONPATH=REPO, RDMAKV_TIMEOUT="60")
    proc = subprocess.run([sys.executable, "-m", "rdmakv.launch", "-n", "2", "-s", "1", "--",
                           sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("launch ok") == 2, proc.stdout


def test_info_lists_devices_like_pyverbs(tmp_path):
    """`python -m rdmakv.info --json` agrees with pyverbs on devices, ports, state, MTU and GIDs."""
    src = "/usr/lib/python3/dist-packages/pyverbs"
    if not os.path.isdir(src):
        pytest.skip("python3-pyverbs is not installed")
    out = subprocess.run([sys.executable, "-m", "rdmakv.info", "--json"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=REPO), check=True).stdout
    info = json.loads(out)
    assert info["transports"]["verbs"].startswith("available")
    text = subprocess.run([sys.executable, "-m", "rdmakv.info"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO), check=True).stdout
    (tmp_path / "pyverbs").symlink_to(src)
    sys.path.insert(0, str(tmp_path))
    try:
        import pyverbs.device as d
    except ImportError as exc:
        pytest.skip(f"pyverbs does not import here: {exc}")
    finally:
        sys.path.remove(str(tmp_path))
    names = [x.name.decode() if isinstance(x.name, bytes) else x.name for x in d.get_device_list()]
    assert [dev["device"] for dev in info["devices"]] == names
    for dev in info["devices"]:
        assert f"hca_id: {dev['device']}" in text
        with d.Context(name=dev["device"]) as ctx:
            for port in dev["ports"]:
                attr = ctx.query_port(port["port"])
                assert port["state"] == {4: "PORT_ACTIVE", 1: "PORT_DOWN", 2: "PORT_INIT"}[attr.state]
                assert port["active_mtu"] == verbs_devices.MTU_BYTES[attr.active_mtu]
                assert port["link_layer"] == {1: "InfiniBand", 2: "Ethernet"}[attr.link_layer]
                assert port["lid"] == attr.lid
                for gid in port["gids"]:
                    theirs = ctx.query_gid(port["port"], gid["index"])
                    theirs = theirs.gid if hasattr(theirs, "gid") else str(theirs)
                    assert ipaddress.IPv6Address(theirs) == ipaddress.IPv6Address(gid["gid"])
                    assert gid["gid"] in text
