"""The database module's pure helpers: the COPY prefetch thread (no server needed)."""

import threading

import pytest

from visitas.db.copy_format import Prefetch


def test_prefetch_yields_in_order_and_passes_errors_on():
    assert list(Prefetch(iter([b"a", b"b", b"c"]), depth=1)) == [b"a", b"b", b"c"]

    def failing():
        yield b"a"
        raise ValueError("formatter broke")

    with pytest.raises(ValueError, match="formatter broke"):
        list(Prefetch(failing()))


def _closes_in_time(consumer: Prefetch, seconds: float = 10.0) -> bool:
    """Close the consumer in a thread; True if that returned (the producer thread ended)."""
    closer = threading.Thread(target=consumer.close, daemon=True)
    closer.start()
    closer.join(seconds)
    return not closer.is_alive()


@pytest.mark.parametrize("items", [
    [b"x"] * 100,          # the producer is still producing
    [b"x", b"y"],          # the producer is done and waits to hand over the end (the old hang)
])
def test_a_consumer_that_stops_stops_the_producer(items):
    stopped = Prefetch(iter(items), depth=1, poll=0.05)
    assert next(stopped) == b"x"
    threading.Event().wait(0.3)  # let the producer fill the queue and block on the next hand-over
    assert _closes_in_time(stopped)


def test_a_producer_error_while_the_consumer_is_gone_does_not_hang():
    def failing():
        yield b"a"
        yield b"b"
        raise ValueError("formatter broke after the consumer left")

    stopped = Prefetch(failing(), depth=1, poll=0.05)
    assert next(stopped) == b"a"
    threading.Event().wait(0.3)
    assert _closes_in_time(stopped)


def test_production_starts_before_the_first_item_is_asked_for():
    started = threading.Event()

    def items():
        started.set()
        yield b"a"

    with Prefetch(items()) as ahead:
        assert started.wait(10)  # nothing asked for yet
        assert list(ahead) == [b"a"]


def test_closing_before_any_item_is_asked_for_stops_the_producer():
    ahead = Prefetch(iter([b"x"] * 100), depth=1, poll=0.05)
    threading.Event().wait(0.3)  # the producer fills the queue and waits to hand over more
    assert _closes_in_time(ahead)
