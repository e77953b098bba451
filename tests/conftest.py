import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("ci", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _transports():
    """What cluster tests run on here: TCP and shared memory everywhere, verbs
    where a usable RDMA device exists (inside the soft-RoCE VM)."""
    from rdmakv.transport.verbs import devices as verbs_devices
    return ["tcp", "shm"] + (["verbs"] if verbs_devices.probe()[0] else [])


@pytest.fixture(params=_transports())
def transport(request, monkeypatch):
    """The transport a test's clusters and in-process workers use, named in the
    test id.  A module opts in with pytestmark = pytest.mark.usefixtures("transport");
    others run on the default (auto: shared memory between co-located processes)."""
    monkeypatch.setenv("RDMAKV_TRANSPORT", request.param)
    monkeypatch.delenv("RDMAKV_SHM", raising=False)
    return request.param


def pytest_collection_modifyitems(items):
    """Mark every test the transport fixture runs over verbs, so that the VM can run
    exactly those (ci/rxe.sh --suite: pytest -m over_verbs)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("transport") == "verbs":
            item.add_marker(pytest.mark.over_verbs)


# The connections a transport may make: over verbs the native engines run a stream, the
# Python data path a VerbsConnection.
CONNECTION_CLASSES = {"tcp": {"TcpConnection"}, "shm": {"ShmConnection"},
                      "verbs": {"VerbsConnection", "VerbsStreamConnection"}}


@pytest.fixture
def closing():
    """make(obj) -> obj, closed when the test ends (rigs, channels: whatever a test builds)."""
    made = []

    def make(obj):
        made.append(obj)
        return obj

    yield make
    for obj in made:
        obj.close()


@pytest.fixture
def cluster_factory(request):
    """Start LocalClusters and guarantee they are torn down.  Under the
    transport fixture, every in-process worker's server links must have used it."""
    from cluster import LocalCluster
    transport = request.getfixturevalue("transport") if "transport" in request.fixturenames else None
    made = []

    def make(num_workers=2, num_servers=1, **env):
        cluster = LocalCluster(num_workers, num_servers, **env)
        made.append(cluster)
        return cluster.start()

    yield make
    used = {type(link.connection).__name__ for cluster in made for kv in cluster.stores
            for link in kv._links if link.connected
            and cluster.env.get("RDMAKV_TRANSPORT") == transport}
    for cluster in made:
        cluster.close()
    if transport is not None:
        assert used <= CONNECTION_CLASSES[transport], f"asked for {transport}, the workers used {used}"
