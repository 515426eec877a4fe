"""The IV pipeline: reservations ahead of the counter, and the only code that moves the counter.

Internal to the speculator. The pipeline holds, sorted by IV, every reservation at an IV >= `next_iv`:
bound ones (SEALING, SEALED, DROPPED: a job was handed out, so the IV belongs to that key forever)
followed by provisional ones (RESERVED: nothing sealed, freely reassigned). An IV >= `next_iv` with no
bound reservation is *clean*: nothing was ever sealed under it.

The counter moves only in `emit(iv)`: IVs `next_iv .. iv-1` are burned by NOPs (any reservation on them
is dropped) and `iv` carries data; then `next_iv = iv + 1`. Hence IVs are emitted in order, each once.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.cc.errors import RekeyRequired
from veil.pipellm.decisions import Reservation, ReservationState
from veil.pipellm.keys import TransferKey

_LIVE = (ReservationState.SEALING, ReservationState.SEALED)


@dataclass(slots=True)
class Slot:
    """A mutable pipeline entry (the speculator's own record)."""

    job_id: int
    iv: int
    key: TransferKey
    state: ReservationState
    version: int | None = None

    @property
    def live(self) -> bool:
        return self.state in _LIVE

    def snapshot(self) -> Reservation:
        return Reservation(self.job_id, self.iv, self.key, self.state, self.version)


class IVPipeline:
    """Reservations at IVs >= `next_iv`, sorted by IV, and the counter itself."""

    def __init__(self, *, iv_limit: int) -> None:
        self.next_iv = 0
        self._iv_limit = iv_limit
        self._slots: list[Slot] = []

    @property
    def slots(self) -> tuple[Slot, ...]:
        return tuple(self._slots)

    @property
    def empty(self) -> bool:
        """True if no reservation of any state is ahead of the counter."""
        return not self._slots

    def advance(self) -> int:
        """Consume the next IV for data when the pipeline is empty (no NOPs); returns it."""
        assert not self._slots, "advance() is for an empty pipeline; use emit()"
        iv = self.next_iv
        self.check_limit(iv)
        self.next_iv = iv + 1
        return iv

    def live(self) -> list[Slot]:
        return [s for s in self._slots if s.live]

    def reserved(self) -> list[Slot]:
        return [s for s in self._slots if s.state is ReservationState.RESERVED]

    def find_live(self, key: TransferKey) -> Slot | None:
        """The live reservation for `key` with the lowest IV, if any."""
        return next((s for s in self._slots if s.live and s.key == key), None)

    def live_tail_key(self) -> TransferKey | None:
        """Key of the live reservation with the highest IV (None: no live one)."""
        for slot in reversed(self._slots):
            if slot.live:
                return slot.key
        return None

    def last_bound_iv(self) -> int:
        """Highest IV already bound (or emitted): new reservations go above it."""
        for slot in reversed(self._slots):  # sorted by IV: the last bound one is the highest
            if slot.state is not ReservationState.RESERVED:
                return slot.iv
        return self.next_iv - 1

    def first_clean_iv(self) -> int:
        """Lowest IV >= next_iv under which nothing was ever sealed."""
        iv = self.next_iv
        for slot in self._slots:  # sorted by IV: walk the run of bound IVs from next_iv
            if slot.state is ReservationState.RESERVED or slot.iv < iv:
                continue
            if slot.iv > iv:
                break
            iv += 1
        self.check_limit(iv)
        return iv

    def check_limit(self, iv: int) -> None:
        if iv >= self._iv_limit:
            raise RekeyRequired(f"IV {iv} reaches the counter limit {self._iv_limit}; re-key the channel")

    def within_limit(self, iv: int) -> bool:
        return iv < self._iv_limit

    def strip_reserved(self) -> None:
        """Forget provisional reservations (nothing was sealed under them).

        Provisional reservations are always a suffix: they are appended above every other IV, and
        `Speculator.plan` binds the lowest ones first.
        """
        slots = self._slots
        while slots and slots[-1].state is ReservationState.RESERVED:
            slots.pop()

    def add_reserved(self, slot: Slot) -> None:
        assert slot.state is ReservationState.RESERVED
        assert not self._slots or slot.iv > self._slots[-1].iv, "reservations are appended in IV order"
        assert slot.iv >= self.next_iv
        self._slots.append(slot)

    def drop_live(self) -> list[Slot]:
        """Drop every live reservation; their IVs stay bound until burned."""
        dropped = self.live()
        for slot in dropped:
            slot.state = ReservationState.DROPPED
        return dropped

    def emit(self, iv: int) -> tuple[range, list[Slot]]:
        """Consume the counter up to and including `iv` (NOPs below, data at `iv`).

        The caller guarantees `iv` is clean or is the IV of the live reservation it commits.
        Returns the NOP IVs and the live reservations those NOPs dropped. Provisional reservations
        must have been stripped first.
        """
        assert iv >= self.next_iv
        self.check_limit(iv)
        dropped: list[Slot] = []
        slots = self._slots
        consumed = 0
        for slot in slots:  # sorted by IV: only a prefix is at or below `iv`
            if slot.iv > iv:
                break
            assert slot.state is not ReservationState.RESERVED, "strip provisional reservations first"
            if slot.iv < iv and slot.live:
                slot.state = ReservationState.DROPPED
                dropped.append(slot)
            consumed += 1
        nops = range(self.next_iv, iv)
        del slots[:consumed]
        self.next_iv = iv + 1
        return nops, dropped
