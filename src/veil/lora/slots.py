"""Which adapter sits in which device slot: LRU eviction with pins. Pure policy (no torch, no I/O).

An adapter is *pinned* while requests that use it run (`acquire` pins, `release` unpins; pins count).
A pinned adapter is never evicted, so its slot's bytes stay valid for every step that uses it. When
every slot holds a pinned adapter and a new one is asked for, `acquire` answers None ("not now"): the
scheduler defers that request rather than stall the batch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """The answer to `SlotTable.acquire`.

    Attributes:
        slot: the adapter's slot.
        load: True if the adapter's bytes must be copied into the slot (it was not resident).
        evicted: the adapter whose slot this was, if one had to go.
    """

    slot: int
    load: bool
    evicted: str | None = None


class SlotTable:
    """`num_slots` slots, each empty or holding one named adapter; least recently acquired goes first.

    Raises:
        ValueError: if num_slots < 1.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident adapters, least recent first
        self._pins: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest slot

    def acquire(self, name: str) -> Placement | None:
        """Pin `name` in a slot, choosing one (free, else the least recently used unpinned) if needed.

        Returns:
            Where it is and whether it must be loaded; None if it is not resident and every slot
            holds a pinned adapter (nothing changes then).
        """
        slot = self._slot_of.get(name)
        placement = None if slot is None else Placement(slot, load=False)
        if placement is None:
            placement = self._place(name)
            if placement is None:
                return None
        self._slot_of[name] = placement.slot
        self._slot_of.move_to_end(name)
        self._pins[name] = self._pins.get(name, 0) + 1
        return placement

    def _place(self, name: str) -> Placement | None:
        if self._free:
            return Placement(self._free.pop(), load=True)
        victim = next((n for n in self._slot_of if not self._pins.get(n)), None)
        if victim is None:
            return None
        return Placement(self._slot_of.pop(victim), load=True, evicted=victim)

    def release(self, name: str) -> None:
        """Drop one pin of `name` (it stays resident, now evictable when its last pin goes).

        Raises:
            ValueError: if `name` is not pinned.
        """
        pins = self._pins.get(name, 0)
        if pins < 1:
            raise ValueError(f"adapter {name!r} is not pinned")
        if pins == 1:
            del self._pins[name]
        else:
            self._pins[name] = pins - 1

    def discard(self, name: str) -> None:
        """Forget `name` and free its slot (after a failed load); its pins go with it."""
        slot = self._slot_of.pop(name, None)
        self._pins.pop(name, None)
        if slot is not None:
            self._free.append(slot)
            self._free.sort(reverse=True)

    def slot_of(self, name: str) -> int | None:
        """The slot `name` is resident in, or None."""
        return self._slot_of.get(name)

    def pins(self, name: str) -> int:
        """How many holders pin `name`."""
        return self._pins.get(name, 0)

    def resident(self) -> dict[str, int]:
        """Resident adapters and their slots, least recently acquired first."""
        return dict(self._slot_of)
