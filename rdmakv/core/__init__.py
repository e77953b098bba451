"""The pure core: the wire protocol, partitioning, the chunk queue, errors and
settings.  Nothing here opens a socket or starts a thread."""
