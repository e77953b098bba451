"""Every connection proves the cluster secret before anything else."""
import numpy as np
import pytest

import rdmakv
from cluster import scaled
from rdmakv.control.auth import AuthenticationError
from rdmakv.core import protocol
from rdmakv.core.protocol import Op

pytestmark = pytest.mark.usefixtures("transport")   # each test once per transport, named in its id
SECRET = "correct horse battery staple"


def test_cluster_with_a_secret_works(cluster_factory, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    cluster = cluster_factory(2, 2, RDMAKV_SECRET_FILE=secret_file)

    def work(kv):
        value = np.full(10, kv.rank + 1, np.int32)
        kv.pushpull("k", value)
        return value.tolist()

    assert cluster.run(work) == [[3] * 10] * 2


@pytest.mark.parametrize("secret,message", [
    (None, "requires a cluster secret"),
    ("wrong", "refused this connection: authentication failed"),
])
def test_a_worker_without_the_secret_is_refused(cluster_factory, secret, message):
    cluster = cluster_factory(1, 1, RDMAKV_SECRET=SECRET)
    with pytest.raises(AuthenticationError, match=message):
        rdmakv.KVStore(**cluster.settings(secret=secret, timeout=scaled(5)))
    # the real worker can still join afterwards
    kv = rdmakv.KVStore(**cluster.settings(secret=SECRET))
    cluster.stores.append(kv)
    value = np.ones(3)
    kv.pushpull("x", value)
    assert value.tolist() == [1, 1, 1]


def test_a_secret_worker_refuses_an_unauthenticated_cluster(cluster_factory):
    cluster = cluster_factory(1, 1)
    with pytest.raises(AuthenticationError, match="does not authenticate"):
        rdmakv.KVStore(**cluster.settings(secret=SECRET, timeout=scaled(5)))


def test_raw_frames_without_the_handshake_are_refused(cluster_factory):
    cluster = cluster_factory(1, 1, RDMAKV_SECRET=SECRET)
    with cluster.raw_connection() as raw:
        hello = protocol.encode_json({"role": "worker", "host": "127.0.0.1", "port": 0, "version": 1})
        raw.sendall(protocol.pack(Op.HELLO, length=len(hello)) + hello)
        received = b""
        while chunk := raw.recv(4096):
            received += chunk
    header = protocol.unpack(received[:protocol.HEADER_SIZE])
    assert header.op == Op.CHALLENGE            # the scheduler spoke first, then hung up on us
    assert b"WELCOME" not in received and b"servers" not in received
    kv = rdmakv.KVStore(**cluster.settings(secret=SECRET))
    cluster.stores.append(kv)
    kv.pushpull("x", np.ones(2))
