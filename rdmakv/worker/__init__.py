"""The worker: rdmakv.KVStore (kvstore.py)."""
