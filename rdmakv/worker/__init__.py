"""The worker: rdmakv.KVStore (kvstore.py) and its parts, one job per module (docs/design.md)."""
