"""The speculator's IVs as the channel's reservations.

The speculator counts IVs as ints; `veil.cc`'s `SenderChannel` hands them out as `Reservation`s, in
order, one per counter. `IvSlots` bridges the two for one epoch: `slot(iv)` reserves every counter up
to `iv` (a counter reserved but never sealed is just a number: nothing was sealed under it), `bind`
gives a slot to a seal job, and `burn` / `emit_sealed` / `seal_and_emit` publish slots strictly in
counter order.

Burning an IV (`burn`): an unsealed reservation is sealed as a NOP; a reservation a worker already
sealed keeps its ciphertext, which is emitted and discarded by the device (the channel never seals a
second message under an IV, so exactly one tag per IV ever leaves the VM). A reservation a worker is
sealing right now is waited for. Workers seal into bounce slots that their reservation holds until
it is emitted; see `veil.pipellm.sealing.seal_into_ring` for why that is safe.

Thread-safety: the table is guarded by its own lock; emission and sealing happen outside it. Only the
transfer in progress emits (transfers are serialized), workers only seal their own slot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from veil.cc.channel import Reservation, SenderChannel
from veil.cc.errors import ReservationError


@dataclass(eq=False)
class IvSlot:
    """One counter of the epoch, reserved on the channel and not yet emitted.

    Attributes:
        reservation: the channel's reservation of this counter.
        job_id: the speculator's job bound to this IV, if any.
        done: set when that job's sealing attempt ended (sealed, failed or refused).
        holds_data: True once a worker sealed data (not a NOP) into the reservation.
    """

    reservation: Reservation
    job_id: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    holds_data: bool = False


class IvSlots:
    """Reserved counters of one epoch, by IV (see module docstring).

    Args:
        sender: the host-to-device sender channel (its counter must equal the speculator's).
    """

    def __init__(self, sender: SenderChannel) -> None:
        self._sender = sender
        self._slots: dict[int, IvSlot] = {}
        self._next = 0  # first counter not reserved on the channel yet (this epoch)
        self._lock = threading.Lock()

    def slot(self, iv: int) -> IvSlot:
        """The slot of `iv`, reserving counters on the channel up to it.

        Raises:
            RekeyRequired: if `iv` is beyond the epoch's counter limit.
        """
        with self._lock:
            while self._next <= iv:
                reservation = self._sender.reserve()
                assert reservation.counter == self._next, "channel and speculator counters diverged"
                self._slots[self._next] = IvSlot(reservation)
                self._next += 1
            return self._slots[iv]

    def bind(self, iv: int, job_id: int) -> IvSlot:
        """Give `iv` to seal job `job_id`."""
        slot = self.slot(iv)
        with self._lock:
            assert slot.job_id is None, "an IV is bound to at most one job"
            slot.job_id = job_id
        return slot

    def burn(self, iv: int) -> bool:
        """Emit `iv` as a NOP, or as the dropped ciphertext a worker sealed under it.

        Returns:
            True if a dropped data ciphertext was emitted (the device authenticates and discards it).
        """
        slot = self._pop(iv)
        reservation = slot.reservation
        while not reservation.sealed:
            try:
                reservation.drop()
            except ReservationError:  # a worker is sealing it right now: let it finish
                slot.done.wait()
        self._emit(slot)
        return slot.holds_data

    def emit_sealed(self, iv: int) -> None:
        """Emit the pre-sealed ciphertext at `iv` (a commit)."""
        slot = self._pop(iv)
        assert slot.holds_data and slot.reservation.sealed, "commit of a chunk that was not sealed"
        self._emit(slot)

    def seal_and_emit(self, iv: int, plaintext: memoryview) -> None:
        """Seal `plaintext` now at the clean IV `iv` (straight into a bounce slot) and emit it."""
        slot = self._pop(iv)
        assert slot.job_id is None, "a synchronous seal must use a clean IV"
        slot.reservation.seal(plaintext)
        self._emit(slot)

    def discard_all(self) -> None:
        """Forget every slot (after a re-key made their reservations stale); workers must be idle."""
        with self._lock:
            self._slots.clear()
            self._next = 0

    def _pop(self, iv: int) -> IvSlot:
        slot = self.slot(iv)
        with self._lock:
            del self._slots[iv]
        return slot

    def _emit(self, slot: IvSlot) -> None:
        self._sender.emit(slot.reservation)
