"""rdmakv's exception hierarchy: catch RdmaKVError for anything the library raises."""


class RdmaKVError(Exception):
    """Base class of every rdmakv error."""


class ConfigError(RdmaKVError, ValueError):
    """A setting (environment variable or keyword argument) is missing or invalid."""


class ProtocolError(RdmaKVError):
    """A peer sent bytes that are not a valid rdmakv message."""


class TransportError(RdmaKVError):
    """Moving bytes to or from a peer failed."""


class ConnectionClosed(TransportError):
    """The peer closed the connection or died."""


class EndOfStream(ConnectionClosed):
    """The peer closed the connection cleanly, between two messages."""


class PeerTimeout(TransportError, TimeoutError):
    """A peer made no progress within RDMAKV_TIMEOUT."""


class RemoteError(RdmaKVError):
    """A server or the scheduler refused an operation; the message says why."""


class ClosedError(RdmaKVError):
    """The KVStore or server was already closed."""
