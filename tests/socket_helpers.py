"""Reading what a peer under test sends over a real socket."""


def recv_exactly(sock, n):
    """n bytes from sock; the peer closing first fails the test."""
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        assert part, "the peer closed the connection"
        data += part
    return bytes(data)
