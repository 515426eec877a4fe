"""Bounce buffers: a ring of fixed-size slots in untrusted shared memory.

All sealed traffic of one direction passes through one ring. The producer acquires a free slot, writes
a sealed message into it and publishes a descriptor (slot index, length); the consumer pops descriptors
in publication order and releases each slot once it has copied the message out. Slot bytes *and*
descriptors live in untrusted memory: an attacker may read and rewrite both. `BounceRing.tap()` is the
seam through which tests play that attacker. Integrity never depends on the ring: it comes from the
channel's counters and tags.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from veil.cc.errors import IntegrityError

POISONED_MESSAGE = "channel poisoned by an earlier integrity failure; re-key required"


@dataclass(frozen=True)
class Descriptor:
    """One published message: which slot holds it and how many bytes (ciphertext + tag) it claims."""

    slot: int
    length: int


class BounceRing:
    """A ring of `slot_count` slots of `slot_bytes` each, with a descriptor queue.

    Args:
        slot_count: number of slots (>= 1).
        slot_bytes: bytes per slot: the largest sealed message (chunk + 16-byte tag).

    Raises:
        ValueError: if a size is not positive.
    """

    def __init__(self, *, slot_count: int, slot_bytes: int) -> None:
        if slot_count < 1 or slot_bytes < 1:
            raise ValueError("slot_count and slot_bytes must be >= 1")
        self.slot_count = slot_count
        self.slot_bytes = slot_bytes
        # Written once now, so every page is resident before traffic (a driver's bounce buffers are
        # allocated and pinned up front); lazily faulted pages would be charged to the first transfers.
        self.memory = torch.zeros(slot_count * slot_bytes, dtype=torch.uint8)
        self._view = memoryview(self.memory.numpy())
        self._cond = threading.Condition()
        self._free: deque[int] = deque(range(slot_count))
        self._pending: deque[Descriptor] = deque()
        self._published: set[int] = set()  # slots named by a descriptor and not yet released
        self._held = False
        self._closed = False

    def slot(self, index: int) -> memoryview:
        """Writable view of slot `index` (all `slot_bytes`)."""
        if not 0 <= index < self.slot_count:
            raise ValueError(f"slot index must be in [0, {self.slot_count})")
        start = index * self.slot_bytes
        return self._view[start : start + self.slot_bytes]

    @property
    def closed(self) -> bool:
        """True once a receiver refused the channel; cleared by `reset()`."""
        return self._closed

    def acquire(self, timeout: float | None = None) -> int:
        """Take a free slot for writing, blocking while none is free.

        Raises:
            IntegrityError: if the ring is closed (the channel is poisoned).
            TimeoutError: if no slot frees up within `timeout` seconds.
        """
        with self._cond:
            if not self._free:
                self._cond.notify_all()  # ring the bell first: the consumer frees slots as it pops
            if not self._cond.wait_for(lambda: self._closed or self._free, timeout):
                raise TimeoutError("no bounce slot became free")
            self._raise_if_closed()
            return self._free.popleft()

    def try_acquire(self, *, keep_free: int = 1) -> int | None:
        """Take a free slot only if more than `keep_free` are free; never blocks.

        Raises:
            IntegrityError: if the ring is closed.
        """
        with self._cond:
            self._raise_if_closed()
            if len(self._free) <= keep_free:
                return None
            return self._free.popleft()

    def publish(self, slot: int, length: int, *, bell: bool = True) -> None:
        """Hand the message in `slot` (its first `length` bytes) to the consumer.

        Args:
            bell: wake the consumer now. False queues the descriptor quietly: a producer publishing
                a run of messages rings once, after the last (`ring_bell`); `acquire` rings before
                it waits, so quiet messages never leave the consumer asleep on a full ring.

        Raises:
            IntegrityError: if the ring is closed.
            ValueError: if `length` does not fit in a slot.
        """
        if not 0 <= length <= self.slot_bytes:
            raise ValueError(f"length must be in [0, {self.slot_bytes}]")
        with self._cond:
            self._raise_if_closed()
            self._pending.append(Descriptor(slot, length))
            self._published.add(slot)
            if bell:
                self._cond.notify_all()

    def ring_bell(self) -> None:
        """Wake the consumer for every descriptor published so far."""
        with self._cond:
            self._cond.notify_all()

    def pop(self, timeout: float | None = None) -> Descriptor:
        """Take the next published descriptor, blocking until one arrives.

        Raises:
            IntegrityError: if the ring is closed.
            TimeoutError: if nothing arrives within `timeout` seconds.
        """
        with self._cond:
            ready = self._cond.wait_for(lambda: self._closed or (self._pending and not self._held), timeout)
            if not ready:
                raise TimeoutError("no sealed message arrived")
            self._raise_if_closed()
            return self._pending.popleft()

    def release(self, slot: int) -> None:
        """Return `slot` to the free list, unless a pending descriptor still names it (a replay)."""
        with self._cond:
            if slot in self._free or any(d.slot == slot for d in self._pending):
                return
            self._published.discard(slot)
            self._free.append(slot)
            self._cond.notify_all()

    def close(self) -> None:
        """Refuse all further traffic and wake every waiter (called when a receiver is poisoned)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reset(self) -> None:
        """Drop every pending descriptor, free all slots and reopen (part of a re-key)."""
        with self._cond:
            self._pending.clear()
            self._published.clear()
            self._free = deque(range(self.slot_count))
            self._closed = False
            self._held = False
            self._cond.notify_all()

    @contextmanager
    def tap(self) -> Iterator[RingTap]:
        """Play the attacker: hold delivery, then read and rewrite slots and descriptors.

        While the context is open the consumer sees nothing (producers may keep publishing). On exit
        delivery resumes from `RingTap.pending` as edited; slots no descriptor names any more are freed.
        """
        with self._cond:
            self._held = True
        tap = RingTap(self)
        try:
            yield tap
        finally:
            with self._cond:
                named = {d.slot for d in self._pending}
                orphans = (self._published | tap._injected) - named - set(self._free)
                self._published -= orphans
                self._free.extend(sorted(orphans))
                self._held = False
                self._cond.notify_all()

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise IntegrityError(POISONED_MESSAGE)


class RingTap:
    """The attacker's handle on a held ring (see `BounceRing.tap`).

    Attributes:
        pending: the ring's own queue of published descriptors, in delivery order; reorder, drop,
            duplicate or replace entries freely while the tap is open.
    """

    def __init__(self, ring: BounceRing) -> None:
        self.ring = ring
        self.pending = ring._pending
        self._injected: set[int] = set()

    def read(self, descriptor: Descriptor) -> bytes:
        """Snoop the bytes a descriptor names."""
        return bytes(self.ring.slot(descriptor.slot)[: descriptor.length])

    def write(self, slot: int, offset: int, data: bytes) -> None:
        """Overwrite bytes of a slot."""
        self.ring.slot(slot)[offset : offset + len(data)] = data

    def inject(self, data: bytes) -> Descriptor:
        """Write `data` into a free slot and return a descriptor for it (not yet queued).

        Raises:
            TimeoutError: if no slot is free.
        """
        with self.ring._cond:
            if not self.ring._free:
                raise TimeoutError("no free slot to inject into")
            slot = self.ring._free.popleft()
        self._injected.add(slot)
        self.write(slot, 0, data)
        return Descriptor(slot, len(data))
