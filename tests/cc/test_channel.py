"""Channel semantics: counters, NOPs, reservations, emission order, exhaustion, poisoning, re-keying."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from veil.cc.channel import TAG_BYTES, ReceiverChannel, message_count
from veil.cc.errors import IntegrityError, RekeyRequired, ReservationError
from veil.cc.session import agree

from .support import Pair, make_pair, receive


def test_messages_round_trip_and_nops_consume_ivs(pair: Pair) -> None:
    payloads = [os.urandom(n) for n in (1, 0, 256, 17, 0)]
    for payload in payloads:
        pair.tx.send(payload)
    assert [receive(pair.rx, len(p)) for p in payloads] == payloads
    assert pair.tx.remaining() == 2**32 - 5 and pair.rx.counter == 5
    assert pair.tx.stats.nops == pair.rx.stats.nops == 2


def test_chunked_send_splits_at_message_size(pair: Pair) -> None:
    data = memoryview(os.urandom(1000))
    pair.tx.send_chunked(data)
    out = memoryview(bytearray(1000))
    pair.rx.receive_chunked(out, timeout=5)
    assert bytes(out) == bytes(data) and pair.rx.counter == message_count(1000, 256) == 4


def test_a_reservation_seals_exactly_once(pair: Pair) -> None:
    reservation = pair.tx.reserve()
    reservation.seal(b"data")
    with pytest.raises(ReservationError, match="exactly once"):
        reservation.seal(b"other")
    with pytest.raises(ReservationError, match="exactly once"):
        reservation.seal_nop()
    reservation.drop()  # already sealed: nothing is resealed
    with pytest.raises(ReservationError, match="exactly once"):
        reservation.seal(b"data")


def test_concurrent_seals_of_one_reservation_only_one_wins(pair: Pair) -> None:
    reservation = pair.tx.reserve()

    def attempt(i: int) -> bool:
        try:
            reservation.seal(bytes([i]) * 64)
        except ReservationError:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(attempt, range(8))) == 1


def test_emission_out_of_counter_order_is_refused(pair: Pair) -> None:
    first, second = pair.tx.reserve(), pair.tx.reserve()
    second.seal(b"second")
    with pytest.raises(ReservationError, match="counter order"):
        pair.tx.emit(second)
    with pytest.raises(ReservationError, match="sealed"):
        pair.tx.emit(first)
    assert pair.tx.emit_ready() == 0
    first.seal(b"first")
    assert pair.tx.emit_ready() == 2
    assert receive(pair.rx, 5) == b"first" and receive(pair.rx, 6) == b"second"


def test_out_of_order_sealing_on_workers_emits_in_order(pair: Pair) -> None:
    reservations = [pair.tx.reserve() for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: reservations[i].seal(bytes([i]) * 32), reversed(range(8))))
    assert pair.tx.emit_ready() == 8
    assert [receive(pair.rx, 32) for _ in range(8)] == [bytes([i]) * 32 for i in range(8)]


def test_dropped_reservations_burn_their_ivs(pair: Pair) -> None:
    unsealed, sealed, kept = pair.tx.reserve(), pair.tx.reserve(), pair.tx.reserve()
    sealed.seal(b"stale speculation")
    unsealed.drop()
    sealed.drop()
    kept.seal(b"wanted")
    assert unsealed.dropped and sealed.dropped and pair.tx.emit_ready() == 3
    pair.rx.receive(None, timeout=5)  # the NOP
    pair.rx.receive(None, timeout=5)  # the stale ciphertext, authenticated and discarded
    assert receive(pair.rx, 6) == b"wanted"


def test_misuse_is_value_error(pair: Pair) -> None:
    with pytest.raises(ValueError, match="at most 256 bytes"):
        pair.tx.reserve().seal(bytes(257))
    with pytest.raises(ValueError, match="snapshot"):
        pair.tx.reserve().seal(bytes(4), in_place=True)


def test_exhaustion_forces_rekey_never_wraps() -> None:
    pair = make_pair(counter_limit=3)
    for i in range(3):
        pair.tx.send(bytes([i]))
    with pytest.raises(RekeyRequired):
        pair.tx.reserve()
    with pytest.raises(RekeyRequired):
        pair.tx.send_chunked(memoryview(b"x"))
    assert [receive(pair.rx, 1) for _ in range(3)] == [b"\0", b"\1", b"\2"]
    pair.rekey(epoch=1)
    assert pair.tx.remaining() == 3
    pair.tx.send(b"after")
    assert receive(pair.rx, 5) == b"after"


def test_receiver_refuses_messages_beyond_the_limit() -> None:
    pair = make_pair(counter_limit=1)
    pair.tx.send(b"a")
    receive(pair.rx, 1)
    with pair.ring.tap() as tap:  # an attacker replays the only message after the limit
        tap.pending.append(tap.inject(bytes(TAG_BYTES + 1)))
    with pytest.raises(IntegrityError):
        receive(pair.rx, 1)


def test_stale_reservation_after_rekey(pair: Pair) -> None:
    reservation = pair.tx.reserve()
    pair.rekey(epoch=1)
    with pytest.raises(ReservationError, match="stale"):
        reservation.seal(b"x")


def test_wrong_key_is_an_integrity_error_and_poisons(pair: Pair) -> None:
    _, other = agree()
    stranger = ReceiverChannel(other.h2d, pair.ring)
    pair.tx.send(b"secret")
    out = memoryview(bytearray(b"untouched!"))[:6]
    with pytest.raises(IntegrityError) as failure:
        stranger.receive(out, timeout=5)
    assert bytes(out) == b"untouc" and stranger.poisoned
    assert str(failure.value) == "message authentication failed"
    assert stranger.stats.integrity_failures == 1


def test_poison_refuses_everything_until_rekey(pair: Pair) -> None:
    pair.tx.send(b"abc")
    with pair.ring.tap() as tap:
        tap.write(tap.pending[0].slot, 0, b"\xff")
    with pytest.raises(IntegrityError):
        receive(pair.rx, 3)
    for _ in range(3):
        with pytest.raises(IntegrityError, match="poisoned"):
            receive(pair.rx, 3)
    with pytest.raises(IntegrityError, match="poisoned"):
        pair.tx.send(b"more")  # the ring is closed: the sender learns of the poison too
    assert pair.rx.stats.integrity_failures == 1 and pair.rx.stats.refused_messages == 3
    pair.rekey(epoch=1)
    assert not pair.rx.poisoned
    pair.tx.send(b"fresh")
    assert receive(pair.rx, 5) == b"fresh"


def test_plaintext_length_mismatch_is_refused(pair: Pair) -> None:
    pair.tx.send(b"four")
    out = memoryview(bytearray(b"xxxxx"))
    with pytest.raises(IntegrityError):
        pair.rx.receive(out, timeout=5)
    assert bytes(out) == b"xxxxx"
