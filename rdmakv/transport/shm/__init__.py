"""Shared memory between co-located peers (connection.py); split by responsibility in the next commit."""
from rdmakv.transport.shm.connection import *  # noqa: F401,F403
from rdmakv.transport.shm.connection import Layer, over, unavailable, wanted  # noqa: F401
