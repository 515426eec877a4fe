"""Races an attacker or a careless engine could provoke on the sender channel: re-key during a seal,
dropping a reservation a worker is sealing, and the counter's single owner."""

from __future__ import annotations

import threading
import time

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.cc.channel import Reservation, iv_for
from veil.cc.errors import ReservationError
from veil.cc.session import agree

from .support import make_pair, receive


class _PausedSeal:
    """Wraps a sender's sealing seam so that the first seal stops halfway until released."""

    def __init__(self, pair_tx: object) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self._inner = pair_tx._seal  # type: ignore[attr-defined]
        self._first = True
        pair_tx._seal = self  # type: ignore[attr-defined]

    def __call__(self, reservation: Reservation, plaintext: object, out: memoryview) -> None:
        if self._first:
            self._first = False
            self.started.set()
            assert self.release.wait(5)
        self._inner(reservation, plaintext, out)


def test_a_seal_racing_a_rekey_uses_its_own_epochs_key() -> None:
    """Defect: the seal checked the epoch, then sealed with whatever key was installed by then, so an
    old reservation could be sealed under the new key at a counter the new epoch also uses."""
    pair = make_pair()
    old_secrets = pair.tx._keys
    paused = _PausedSeal(pair.tx)
    stale = pair.tx.reserve()
    worker = threading.Thread(target=lambda: stale.seal(b"old epoch's chunk"))
    worker.start()
    assert paused.started.wait(5)
    host, device = agree(1)
    pair.ring.reset()
    pair.tx.rekey(host.h2d)
    pair.rx.rekey(device.h2d)
    paused.release.set()
    worker.join(5)
    sealed = stale.message()
    new_key = AESGCM(host.h2d.key)
    with pytest.raises(InvalidTag):  # it must not authenticate as the new epoch's message 0
        new_key.decrypt(iv_for(0, host.h2d.iv_mask), sealed, None)
    assert old_secrets.aead.decrypt(iv_for(0, old_secrets.mask), sealed, None) == b"old epoch's chunk"
    with pytest.raises(ReservationError, match="another channel or epoch"):
        pair.tx.emit(stale)
    pair.tx.send(b"new epoch's chunk")
    assert receive(pair.rx, 17) == b"new epoch's chunk"


def test_drop_waits_for_a_seal_in_progress_without_spinning() -> None:
    """Defect: burning an IV a worker was sealing busy-spun on `drop()` until the worker finished."""
    pair = make_pair()
    paused = _PausedSeal(pair.tx)
    reservation = pair.tx.reserve()
    worker = threading.Thread(target=lambda: reservation.seal(b"chunk"))
    worker.start()
    assert paused.started.wait(5)
    dropper = threading.Thread(target=reservation.drop)
    cpu_before = time.thread_time()
    dropper.start()
    time.sleep(0.3)
    assert dropper.is_alive()  # it waits for the worker...
    paused.release.set()
    dropper.join(5)
    worker.join(5)
    assert not dropper.is_alive() and reservation.carries_data and reservation.dropped
    assert time.thread_time() - cpu_before < 0.2  # ...asleep, not spinning on this process's CPU
    pair.tx.emit(reservation)
    pair.rx.receive(None, timeout=5)  # authenticated and discarded


def test_at_reserves_in_order_and_refuses_emitted_counters() -> None:
    pair = make_pair()
    third = pair.tx.at(2)
    assert third.counter == 2 and pair.tx.remaining() == 2**32 - 3
    assert pair.tx.at(0).counter == 0 and pair.tx.at(2) is third
    for counter in range(3):
        pair.tx.at(counter).seal(bytes([counter]))
    assert pair.tx.emit_ready() == 3 and pair.tx.next_counter == 3
    with pytest.raises(ReservationError, match="already emitted"):
        pair.tx.at(1)
    assert [receive(pair.rx, 1) for _ in range(3)] == [b"\x00", b"\x01", b"\x02"]


def test_sealing_never_writes_the_shared_ring() -> None:
    """Seals go to private staging; only emission copies the finished message into a slot."""
    pair = make_pair()
    before = bytes(pair.ring.memory.numpy())
    reservation = pair.tx.reserve()
    reservation.seal(b"x" * 200)
    assert bytes(pair.ring.memory.numpy()) == before
    pair.tx.emit(reservation)
    assert receive(pair.rx, 200) == b"x" * 200


def test_snapshot_seals_exactly_the_bytes_it_copied() -> None:
    pair = make_pair()
    source = bytearray(b"A" * 64)
    reservation = pair.tx.reserve()
    copy = reservation.snapshot(memoryview(source))
    source[:] = b"B" * 64  # a write after the snapshot does not reach the ciphertext
    reservation.seal(copy, in_place=True)
    pair.tx.emit(reservation)
    assert receive(pair.rx, 64) == b"A" * 64


def test_staging_moves_a_sealed_message_into_a_spare_slot_only() -> None:
    """A worker may copy a finished message into a slot ahead of emission, but never one of the
    last `keep_free` free slots: staged messages can never starve the emitter (no deadlock)."""
    pair = make_pair(slots=3)
    first, second, third = (pair.tx.reserve() for _ in range(3))
    for index, reservation in enumerate((first, second, third)):
        reservation.seal(bytes([index]) * 8)
    assert first.stage(keep_free=1) and second.stage(keep_free=1)
    assert not third.stage(keep_free=1)  # the last free slot is the emitter's
    assert first.message() == pair.tx.at(0).message() and not first.stage()
    pair.tx.emit_ready()  # staged ones publish from their slots, the third is copied now
    assert [receive(pair.rx, 8) for _ in range(3)] == [bytes([i]) * 8 for i in range(3)]
    unsealed = pair.tx.reserve()
    assert not unsealed.stage()  # nothing to stage before sealing
