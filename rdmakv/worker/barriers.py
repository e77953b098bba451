"""A worker's barriers: numbered in the order they are called, passed when
the scheduler says BARRIER_DONE for that number."""
from __future__ import annotations

import threading

from rdmakv.core.errors import PeerTimeout
from rdmakv.core.protocol import Op


class Barriers:
    def __init__(self, control, failure):
        self._control = control       # the ControlLink to the scheduler
        self._failure = failure       # () -> the job's failure, or None
        self._number = 0
        self._done: dict[int, bool] = {}
        self._cond = threading.Condition()

    def wait(self, limit):
        """Return once every worker has reached this barrier; PeerTimeout after limit seconds."""
        with self._cond:
            self._number += 1
            number = self._number
        self._control.send(Op.BARRIER, round=number)
        with self._cond:
            if not self._cond.wait_for(lambda: number in self._done or self._failure(), limit):
                raise PeerTimeout(f"barrier {number}: not every worker arrived within {limit:g} s")
            failure = self._failure()
            if failure is not None:
                raise failure
            del self._done[number]

    def passed(self, number):
        """The scheduler's BARRIER_DONE for barrier number."""
        with self._cond:
            self._done[number] = True
            self._cond.notify_all()

    def wake(self):
        """The job failed: waiters raise its failure."""
        with self._cond:
            self._cond.notify_all()
