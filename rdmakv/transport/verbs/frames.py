"""The verbs transport's wire layout, which both sides must share: the slots a
SEND lands in, the frame prefix in front of the rdmakv header, what an OFFER
carries and what an immediate names (see the package's documentation)."""
import struct

from rdmakv.core import protocol

SLOT_BYTES = 16384           # one receive/send slot: frame prefix + header + eager payload
DATA_SLOTS = 64              # receive slots for messages (the peer's credits)
CTRL_SLOTS = 16              # receive slots for clear-to-send, credits and write-with-imm
SEND_SLOTS = 64              # registered send slots

OFFER_SLOTS = 4096           # buffers this side may have offered to the peer at once
OFFER_HEADER_BYTES = 64      # one entry of the table the peer writes a placed message's header into

# frame prefix: kind, flags, returned credits, id, rkey, addr
PREFIX = struct.Struct("<BBHIIQ4x")
MAX_RETURNED_CREDITS = 0xFFFF  # what the prefix's credit field holds
K_EAGER, K_RNDV, K_CTS, K_CREDIT, K_OFFER = 1, 2, 3, 4, 5
K_PLACED = 6                 # inbox only: a message the peer wrote into an offered buffer
EAGER_LIMIT = SLOT_BYTES - PREFIX.size - protocol.HEADER_SIZE
# an offer's body: the tag's stream (protocol.TAG_STREAM_BYTES, little-endian) and
# sequence, length, header entry addr, header table rkey (the payload buffer's rkey
# and addr travel in the prefix)
OFFER = struct.Struct(f"<{protocol.TAG_STREAM_BYTES}sQQQI")
# immediate data: a rendezvous message id, or PLACED_BIT | the offer it fills
PLACED_BIT = 1 << 31
