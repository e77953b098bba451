import pytest
from hypothesis import given, strategies as st

from rdmakv.core.chunk_queue import ChunkQueue

items = st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 9), st.integers(0, 3), st.integers(0, 5000)),
                 max_size=60)


def fill(queue, entries):
    for number, (priority, key, chunk, nbytes) in enumerate(entries):
        queue.push(number, priority=priority, key_order=key, chunk=chunk, nbytes=nbytes)


@given(items)
def test_pop_order_is_priority_then_key_then_chunk_then_arrival(entries):
    queue = ChunkQueue(0)
    fill(queue, entries)
    order = []
    while (popped := queue.pop()) is not None:
        order.append(popped[0])
    expected = sorted(range(len(entries)), key=lambda n: (-entries[n][0], entries[n][1], entries[n][2], n))
    assert order == expected


@given(items, st.integers(1, 20000), st.randoms(use_true_random=False))
def test_credit_is_never_exceeded_and_nothing_starves(entries, credit, rng):
    queue = ChunkQueue(credit)
    fill(queue, entries)
    in_flight = []
    sent = 0
    while len(queue) or in_flight:
        popped = queue.pop()
        if popped is not None:
            in_flight.append(popped[1])
            sent += 1
            # a chunk bigger than the whole credit may only travel alone
            assert queue.in_flight <= credit or len(in_flight) == 1
        else:
            assert in_flight, "out of credit with nothing in flight: a deadlock"
            queue.finish(in_flight.pop(rng.randrange(len(in_flight))))
    assert sent == len(entries) and queue.in_flight == 0


def test_a_high_priority_chunk_overtakes_waiting_low_priority_chunks():
    queue = ChunkQueue(credit=100)
    for chunk in range(5):
        queue.push(("low", chunk), priority=-1, key_order=0, chunk=chunk, nbytes=100)
    assert queue.pop()[0] == ("low", 0)
    queue.push(("high", 0), priority=10, key_order=1, chunk=0, nbytes=100)
    assert queue.pop() is None                 # credit is spent
    queue.finish(100)
    assert queue.pop()[0] == ("high", 0)


def test_finish_more_than_in_flight_is_an_error():
    queue = ChunkQueue(10)
    with pytest.raises(ValueError):
        queue.finish(1)
