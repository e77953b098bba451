from hypothesis import given, strategies as st

from rdmakv import partition

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


@given(st.lists(st.integers(0, 1 << 20), min_size=1, max_size=50), st.integers(1, 6), st.integers(64, 1 << 16))
def test_placement_is_balanced_and_identical_on_every_worker(sizes, servers, partition_bytes):
    placements = []
    for _ in range(3):                      # three workers declaring the same keys in the same order
        placement = partition.Placement(servers)
        chunks = [placement.place(partition.split(size, 1, partition_bytes)) for size in sizes]
        placements.append((chunks, placement.load))
    assert placements[0] == placements[1] == placements[2]
    chunks, load = placements[0]
    largest = max(max(c.nbytes, 1) for key in chunks for c in key)
    assert max(load) - min(load) <= largest
    assert sum(load) == sum(max(c.nbytes, 1) for key in chunks for c in key)
    assert all(0 <= c.server < servers for key in chunks for c in key)


def test_split_rejects_nonsense():
    import pytest
    with pytest.raises(ValueError):
        partition.split(10, 4, 1024)
    with pytest.raises(ValueError):
        partition.split(16, 8, 4)
