"""rdmakv: parameter-server push/sum/pull over RDMA verbs or TCP."""
__version__ = "0.1.0"
