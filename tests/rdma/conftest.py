"""Fixtures for the real-verbs tests (they run inside the soft-RoCE VM, see
ci/rxe.sh).  Everything here opens real devices; where there is none, every
test in tests/rdma is skipped with probe()'s reason."""
import threading

import numpy as np
import pytest

from rdmakv.transport.verbs import devices as verbs_devices



@pytest.fixture(scope="session")
def device():
    """(Context, PortInfo) for the whole session; closed (with every child) at the end."""
    ctx, port = verbs_devices.open_device()
    yield ctx, port
    ctx.close()


@pytest.fixture
def ctx(device):
    return device[0]


@pytest.fixture
def port(device):
    return device[1]


class Side:
    """One end of a connection: PD, channel, CQ and RC QP on the shared Context."""

    def __init__(self, ctx, port, t):
        from rdmakv.transport.verbs import qp as verbs_qp
        self.pd = t.PD(ctx)
        self.channel = t.CompChannel(ctx)
        self.cq = t.CQ(ctx, 64, self.channel)
        self.qp = t.QP(self.pd, self.cq, max_send_wr=32, max_recv_wr=32, max_inline_data=64)
        self.psn = verbs_qp.new_psn()
        self.endpoint = verbs_qp.local_endpoint(self.qp, port, self.psn)

    def close(self):
        # Deliberately the parents only: they close their children.
        self.cq.close()
        self.pd.close()
        self.channel.close()


@pytest.fixture
def connect_pair(ctx, port):
    """A factory: two RC QPs in this process, connected to each other over the
    port (through loopback on rxe).  Everything is closed at teardown."""
    from rdmakv.native import transport as t
    from rdmakv.transport.verbs import qp as verbs_qp
    made = []

    def make():
        a, b = Side(ctx, port, t), Side(ctx, port, t)
        made.extend((a, b))
        verbs_qp.connect_rc(a.qp, port, b.endpoint, a.psn)
        verbs_qp.connect_rc(b.qp, port, a.endpoint, b.psn)
        return a, b

    yield make
    for side in made:
        side.close()


@pytest.fixture
def pair(connect_pair):
    return connect_pair()


@pytest.fixture
def arrays():
    rng = np.random.default_rng(1234)
    return rng.standard_normal(64 * 1024).astype(np.float32), np.zeros(64 * 1024, np.float32)


@pytest.fixture
def pair_factory():
    """Connected (client, server) verbs connections over 127.0.0.1 through the
    transport's own listener and connect (native: the stream the native engines
    run, else the Python data path's VerbsConnection); all closed at teardown."""
    from rdmakv.transport import verbs
    made = []

    def make(timeout=20.0, native=False):
        listener = verbs.Listener("127.0.0.1", 0, timeout)
        made.append(listener)
        box = {}
        thread = threading.Thread(target=lambda: box.update(
            c=verbs.connect("127.0.0.1", listener.address[1], timeout, native=native)))
        thread.start()
        server = listener.accept(timeout)
        thread.join(timeout)
        assert server is not None and "c" in box
        made.extend((box["c"], server))
        return box["c"], server

    yield make
    for thing in reversed(made):
        thing.close()
