"""The servers' optimizer, for rdmakv.mxnet (update_on_kvstore=True): set it
on every server, save its states and load them back."""
from __future__ import annotations

from rdmakv.core import protocol
from rdmakv.core.protocol import Op


class ServerOptimizer:
    def __init__(self, links, engine, timeout, declared_per_server):
        self._links = links
        self._engine = engine         # the native engine, or None on the Python data path
        self._timeout = timeout
        self._declared_per_server = declared_per_server   # () -> [(bytes, chunks) of the declared keys]

    def set(self, description):
        """Run the optimizer described (rdmakv.mxnet.optimizer.describe) on every server."""
        payload = protocol.encode_json(description)
        for link in self._links:
            link.request(Op.SET_OPTIMIZER, payload, self._timeout)

    def dump_states(self):
        """Every server's optimizer states, as opaque bytes, in server order."""
        if self._engine is None:
            return [link.request(Op.GET_STATES, None, self._timeout) for link in self._links]
        states = []
        for link, (nbytes, count) in zip(self._links, self._declared_per_server()):
            self._engine.allow_states(link.rank, protocol.state_limit(nbytes, count))   # only while asked
            try:
                states.append(link.request(Op.GET_STATES, None, self._timeout))
            finally:
                self._engine.allow_states(link.rank, 0)
        return states

    def load_states(self, states):
        """Give every server back the states dump_states() returned."""
        if len(states) != len(self._links):
            raise ValueError(f"the saved states are for {len(states)} servers, this cluster has {len(self._links)}")
        for link, data, (nbytes, count) in zip(self._links, states, self._declared_per_server()):
            limit = protocol.state_limit(nbytes, count)
            if len(data) > limit:
                raise ValueError(f"the saved optimizer state for server {link.rank} has {len(data)} bytes, more "
                                 f"than the {limit} its {count} declared chunks allow: init() the keys "
                                 f"before loading their states")
        for link, data in zip(self._links, states):
            link.request(Op.SET_STATES, data, self._timeout)
