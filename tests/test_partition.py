from hypothesis import given, strategies as st

from rdmakv.core import partition

itemsizes = st.sampled_from([1, 2, 4, 8])


@given(st.integers(0, 1 << 22), itemsizes, st.integers(8, 1 << 20))
def test_chunks_cover_the_tensor_exactly_once(items, itemsize, partition_bytes):
    nbytes = items * itemsize // 64 * 64 if items * itemsize > 64 else items * itemsize
    nbytes -= nbytes % itemsize
    pieces = partition.split(nbytes, itemsize, partition_bytes)
    position = 0
    for offset, size in pieces:
        assert offset == position
        assert size % itemsize == 0
        assert size <= max(partition_bytes, itemsize)
        position += size
    assert position == nbytes
    assert all(size > 0 for _, size in pieces) or pieces == [(0, 0)]


@given(st.integers(1, 1 << 26), st.integers(partition.PAGE, 1 << 23))
def test_large_chunks_start_on_page_boundaries(nbytes, partition_bytes):
    nbytes -= nbytes % 4
    if nbytes == 0:
        return
    for offset, _ in partition.split(nbytes, 4, partition_bytes):
        assert offset % partition.PAGE == 0


@given(st.dictionaries(st.integers(0, 2**64 - 1), st.integers(0, 1 << 20), min_size=1, max_size=50),
       st.integers(1, 6), st.integers(64, 1 << 16), st.randoms())
def test_placement_depends_only_on_the_key(keys, servers, partition_bytes, rng):
    """Workers whose threads declare the same keys in different orders agree on every chunk's
    server, and each key's bytes are balanced over the servers within one chunk."""
    first = {wire: partition.place(wire, partition.split(size, 1, partition_bytes), servers)
             for wire, size in keys.items()}
    shuffled = list(keys.items())
    rng.shuffle(shuffled)
    assert {wire: partition.place(wire, partition.split(size, 1, partition_bytes), servers)
            for wire, size in shuffled} == first
    for chunks in first.values():
        assert all(0 <= c.server < servers for c in chunks)
        load = [sum(c.nbytes for c in chunks if c.server == s) for s in range(servers)]
        assert max(load) - min(load) <= max(c.nbytes for c in chunks)


def test_split_rejects_nonsense():
    import pytest
    with pytest.raises(ValueError):
        partition.split(10, 4, 1024)
    with pytest.raises(ValueError):
        partition.split(16, 8, 4)
