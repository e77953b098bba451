"""Flow control for one verbs connection: this side's free send slots, its
credits (one per receive slot the peer keeps for messages) and the credits it
owes the peer for messages it consumed.  Pure accounting, under the
connection's Condition; the Sender moves the credits."""
from rdmakv.transport.verbs.frames import DATA_SLOTS, MAX_RETURNED_CREDITS, SEND_SLOTS

RETURN_BATCH = DATA_SLOTS // 4   # owed credits worth a CREDIT frame of their own


class FlowControl:
    """Every method is called with the connection's cv held."""

    def __init__(self, state):
        self._state = state
        self._free_slots = list(range(SEND_SLOTS))
        self._credits = 0              # messages we may still send
        self._owed = 0                 # consumed slots whose credit the peer has not got back

    def connected(self, peer_slots):
        """The peer's receive slots for messages, from its endpoint: our first credits."""
        self._credits = peer_slots

    def take_slot(self, uses_credit, what, deadline=None):
        """Wait for a free send slot, and a credit too if uses_credit; returns the slot."""
        self._state.wait(lambda: self._free_slots and (self._credits > 0 or not uses_credit), what, deadline)
        slot = self._free_slots.pop()
        if uses_credit:
            self._credits -= 1
        return slot

    def has_free_slot(self):
        return bool(self._free_slots)

    def all_slots_free(self):
        """Every SEND posted has completed."""
        return len(self._free_slots) == SEND_SLOTS

    def slot_free(self, slot):
        self._free_slots.append(slot)

    def granted(self, credits):
        """The peer returned `credits` (in a frame's prefix)."""
        self._credits += credits

    def consumed(self):
        """One of the peer's messages was taken off its receive slot: we owe it a credit."""
        self._owed += 1

    def owes_a_batch(self):
        return self._owed >= RETURN_BATCH

    def take_owed(self):
        """The owed credits one frame's prefix carries back, no longer owed."""
        credits = min(self._owed, MAX_RETURNED_CREDITS)
        self._owed -= credits
        return credits
