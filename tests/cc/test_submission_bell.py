"""One submission, one bell: a run of messages published quietly wakes the consumer once, and quiet
messages never leave it asleep (a full ring, a failure part way)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from veil.cc.errors import ReservationError

from .support import Pair, make_pair, receive

ASLEEP_S = 5.0  # the consumer's own timeout: reached only if no bell woke it


def _consume(pair: Pair, sizes: list[int]) -> tuple[threading.Thread, list[bytes]]:
    """A consumer thread already waiting for `len(sizes)` messages (each within `ASLEEP_S`)."""
    got: list[bytes] = []

    def run() -> None:
        for size in sizes:
            out = memoryview(bytearray(size))
            pair.rx.receive(out, timeout=ASLEEP_S)
            got.append(bytes(out))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.05)  # let it block on the empty ring
    return thread, got


def _emit_run_to_a_sleeping_consumer(pair: Pair, payloads: list[bytes]) -> tuple[list[bytes], float]:
    """What a consumer already asleep on the ring receives of one `emit_run`, and how long it took."""
    thread, got = _consume(pair, [len(p) for p in payloads])
    reservations = [pair.tx.reserve() for _ in payloads]
    for reservation, payload in zip(reservations, payloads, strict=True):
        reservation.seal(payload)
    start = time.monotonic()
    pair.tx.emit_run(reservations)
    thread.join(ASLEEP_S * 2)
    return got, time.monotonic() - start


def test_a_run_emitted_as_one_submission_arrives_in_order() -> None:
    payloads = [os.urandom(n) for n in (200, 1, 256)]
    got, seconds = _emit_run_to_a_sleeping_consumer(make_pair(), payloads)
    assert got == payloads
    assert seconds < ASLEEP_S / 2, "the consumer slept through the run's bell"


def test_a_producer_that_waits_for_a_slot_rings_the_bell_first() -> None:
    """One slot: the second message of a run needs the slot the first (published quietly) holds. The
    producer rings before it waits, or the consumer would sleep until its own timeout."""
    payloads = [os.urandom(100), os.urandom(50)]
    got, seconds = _emit_run_to_a_sleeping_consumer(make_pair(slots=1), payloads)
    assert got == payloads
    assert seconds < ASLEEP_S / 2, "the consumer slept while the producer waited"


def test_a_run_that_fails_part_way_delivers_what_it_published() -> None:
    pair = make_pair()
    first, unsealed = pair.tx.reserve(), pair.tx.reserve()
    first.seal(b"first")
    thread, got = _consume(pair, [5])
    start = time.monotonic()
    with pytest.raises(ReservationError, match="sealed"):
        pair.tx.emit_run([first, unsealed])
    thread.join(ASLEEP_S * 2)
    assert got == [b"first"] and pair.tx.next_counter == 1
    assert time.monotonic() - start < ASLEEP_S / 2, "the failed run never rang the bell"
    unsealed.seal(b"second")
    pair.tx.emit(unsealed)
    assert receive(pair.rx, 6) == b"second"
