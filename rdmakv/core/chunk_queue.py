"""Priority order and a byte credit for chunks waiting to be sent.  Pure: no I/O,
no threads; the caller holds its own lock.

Ready chunks leave highest priority first, then in key declaration order, then
by chunk index, then first come first served.  At most `credit` bytes are in
flight (sent, result not yet back); a chunk larger than the whole credit still
leaves when nothing else is in flight, so nothing can wait forever."""
import heapq
import itertools


class ChunkQueue:
    def __init__(self, credit=0):
        """credit: bytes allowed in flight; 0 means unlimited."""
        if credit < 0:
            raise ValueError("credit must be >= 0")
        self.credit = credit
        self.in_flight = 0            # bytes
        self.chunks_in_flight = 0
        self._heap = []
        self._arrival = itertools.count()

    def __len__(self):
        return len(self._heap)

    def push(self, item, *, priority, key_order, chunk, nbytes):
        heapq.heappush(self._heap, (-priority, key_order, chunk, next(self._arrival), nbytes, item))

    def pop(self):
        """(item, nbytes) of the next chunk to send, or None if empty or out of credit."""
        if not self._heap:
            return None
        nbytes = self._heap[0][4]
        if self.credit and self.chunks_in_flight and self.in_flight + nbytes > self.credit:
            return None
        entry = heapq.heappop(self._heap)
        self.in_flight += nbytes
        self.chunks_in_flight += 1
        return entry[5], nbytes

    def finish(self, nbytes):
        """Return the credit of a chunk whose result arrived (or that failed)."""
        if nbytes > self.in_flight or not self.chunks_in_flight:
            raise ValueError(f"finishing {nbytes} bytes but only {self.in_flight} are in flight")
        self.in_flight -= nbytes
        self.chunks_in_flight -= 1

    def drain(self):
        """Remove and return every queued item (used when a connection fails)."""
        items = [entry[5] for entry in self._heap]
        self._heap.clear()
        return items
