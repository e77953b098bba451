"""The RDMA verbs transport: the same contract as tcp.py over RC queue pairs.

Connection set-up.  A TCP socket carries the set-up: each side sends a JSON
description of its QP (verbs_qp.local_endpoint plus its receive-slot
geometry), both walk their QP to RTS, then trade a ready byte.  The socket
then stays open for liveness only: its end of file means the peer is gone,
and a clean close() says so first with a goodbye byte.  The listener never
waits on a peer (see VerbsListener): it allocates nothing for a connection
before that connection's endpoint is in.

Every connection has its own protection domain, completion channel, CQ and
RC QP on a process-wide device Context, and a progress thread that waits on
the CQ (CQ.wait: spin briefly, then sleep on the channel, GIL released) and
hands completions to the threads waiting for them.  An accepted connection
starts that thread only when someone first waits on it; until then
readable_bytes() reaps completions itself, so the authentication handshake
(node.Gate) costs no thread.

Messages.  Each SEND carries a 24-byte frame prefix (kind, returned credits,
message id, rkey, address) before the rdmakv header:

- eager: header and a payload of at most `eager_limit` bytes, copied into a
  registered send slot; the receiver copies the payload from its receive slot
  into the destination on recv_payload().  Such copies are counted in
  `copied_bytes`.
- placed (larger payloads the receiver offered a buffer for, zero copy, one
  way): offer(tag, buffer) registers the buffer (remote write) and sends an
  OFFER frame {offer id, addr, rkey, the tag, and where the header goes}.
  Tags (protocol.Tag: a stream and a sequence number) are computed by the
  layer above; this transport only compares them, and finds a message's tag
  with protocol.tag_of.  When the sender later sends that message, it RDMA-writes the
  48-byte header into the receiver's offer-header table entry, then the
  payload straight from the caller's array into the offered buffer with
  WRITE_WITH_IMM, immediate = PLACED_BIT | offer id (RC places both writes
  before the immediate completes).  The receiver checks the header's tag and
  length against its offer.  The KVStore offers each result's destination before pushing,
  and the server offers each worker a slot per chunk for its next push, so
  both directions skip the round trip below.
- rendezvous (larger payloads without an offer, zero copy): the header goes
  alone.  On recv_payload(header, dest) the receiver registers `dest`
  (remote write) through its MR cache and answers clear-to-send {id, addr,
  rkey}; the sender RDMA-writes straight from the caller's array with the
  immediate = id, which completes the receiver's wait.

In both, the sender registers its own buffer with local access only (the
peer never reads worker memory), and send() returns once its write completed.

The progress thread takes offers in as they arrive, so a sender sees an offer
whatever its own reader is doing; their credits go back in a CREDIT frame it
sends only from a free send slot (it must never wait).  A new offer for the
same tag stream replaces the last; at most OFFER_SLOTS are open per
connection, and with none free a message simply goes by rendezvous.

Flow control: the sender holds one credit per receive slot the peer keeps
for messages (eager, rendezvous, offer and placed messages each take one);
the receiver returns credits as it consumes messages,
piggybacked on its own frames or in a CREDIT frame.  Clear-to-send, credit
frames and write-with-immediate land in extra slots that the progress thread
reposts at once, so they can never be starved by unread messages.

rkeys are only ever sent to the peer of their connection, whose PD they
belong to, and die with it: close() destroys QP -> CQ -> MRs -> PD -> channel
and drops the device Context when its last user goes.

Files: devices.py (device, port and GID choice, the process-wide device),
qp.py (QP state changes), mrcache.py (registrations), frames.py (the wire
layout), connection.py (one connection, composed of the parts its
documentation lists: state, resources, credits, sender, the eager, rendezvous
and offers protocols, receiver, progress), handshake.py (the set-up's
messages), listener.py (set-up, both sides).
"""
from rdmakv.transport.verbs.connection import VerbsConnection
from rdmakv.transport.verbs.frames import EAGER_LIMIT
from rdmakv.transport.verbs.listener import VerbsListener, connect

Listener = VerbsListener      # the name every transport module exports

__all__ = ["Listener", "connect", "VerbsConnection", "EAGER_LIMIT"]
