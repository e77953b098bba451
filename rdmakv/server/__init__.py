"""The parameter server (server.py): sums what workers push and answers them.
`python -m rdmakv.server` (__main__.py) runs a server or the scheduler."""
