"""What every part of one verbs connection shares: the Condition that guards
all their state, whether (and why) the connection can no longer be used, and
the bounded wait each caller uses until the progress thread hands it what it
waits for."""
import threading
import time

from rdmakv.core.errors import ConnectionClosed, PeerTimeout


class ConnectionState:
    """One Condition for a whole connection: the progress thread changes the
    parts' state under it and notifies; callers wait on it.  It is re-entrant,
    so a part may call another's cv-held method while holding it."""

    def __init__(self, peer, timeout, start_progress):
        self.peer = peer
        self.timeout = timeout          # RDMAKV_TIMEOUT: no wait lasts longer without progress
        self.cv = threading.Condition()
        self._start_progress = start_progress   # a waiter needs the progress thread running
        self._closed = False            # close() was called here
        self._error = None              # why the connection is unusable (ConnectionClosed, ...)

    @property
    def closed(self):
        return self._closed

    @property
    def error(self):
        return self._error

    def fail(self, error):
        """Make the connection unusable with `error` (the first reason stays); wakes every waiter."""
        with self.cv:
            if self._error is None:
                self._error = error
            self.cv.notify_all()

    def mark_closed(self):
        """Closed here from now on; wakes every waiter.  False if it already was."""
        with self.cv:
            if self._closed:
                return False
            self._closed = True
            self.cv.notify_all()
            return True

    def check(self, what):
        """Raise the reason this connection can't be used, if any (cv held)."""
        if self._closed:
            raise ConnectionClosed(f"{what} {self.peer}: connection closed")
        if self._error is not None:
            raise self._error

    def wait(self, ready, what, deadline=None):
        """Wait (cv held) until ready() is true, the connection fails or the deadline
        (RDMAKV_TIMEOUT from now if none) passes."""
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout
        while True:
            self.check(what)
            if ready():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"{what} {self.peer}: no progress for {self.timeout:g} s (RDMAKV_TIMEOUT)")
            self.sleep(left)

    def sleep(self, seconds):
        """Wait (cv held) for a notification, at most `seconds`, with the progress
        thread running to send one."""
        self._start_progress()
        self.cv.wait(seconds)
