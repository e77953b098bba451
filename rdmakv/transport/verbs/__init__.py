"""The RDMA verbs transport (connection.py); split by responsibility in the next commit."""
from rdmakv.transport.verbs.connection import *  # noqa: F401,F403
from rdmakv.transport.verbs.connection import Listener, connect  # noqa: F401
