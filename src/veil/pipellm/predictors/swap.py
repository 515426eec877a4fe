"""Swap predictor: a swap-in mirrors an earlier swap-out (vLLM-style KV-cache preemption).

When device blocks run out, the engine swaps out the newest requests' KV blocks (device to host);
later it swaps requests back in. Requests come back in the order they left: the oldest swapped-out
request first, as veil's scheduler (`engine/scheduler.py`, "swapped sequences come back, oldest
first") and vLLM's bring them back; inside a request, blocks come back in the order they left (FIFO
by layer). The swap-in of a chunk
reads the very host range its swap-out wrote, so the predicted key is the swap-out key mirrored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from veil.pipellm.keys import Direction, TransferKey
from veil.pipellm.predictors.base import Predictor


class SwapPredictor(Predictor):
    """Predicts host-to-device swap-ins from the device-to-host swap-outs seen before.

    Groups: consecutive swap-outs form one group (one preempted request). A group ends when any
    host-to-device transfer is observed, or when the engine calls `new_group()` (explicit boundary; the
    transparent rule needs no call). Each group is a FIFO, and so is the queue of groups: the oldest
    group is predicted first.

    Args:
        max_groups: groups remembered; the oldest are forgotten first.
    """

    def __init__(self, *, max_groups: int = 1024) -> None:
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        self._groups: deque[deque[TransferKey]] = deque(maxlen=max_groups)
        self._open = False  # True while the top group still accepts swap-outs
        self._held: set[TransferKey] = set()  # every key in any group (each is in one group at most)

    def new_group(self) -> None:
        """Start a new group at the next swap-out (an engine that knows request boundaries says so)."""
        self._open = False

    def observe(self, key: TransferKey) -> None:
        if key.direction is Direction.D2H:
            self._swapped_out(key.mirrored())
            return
        self._open = False
        self._swapped_in(key)

    def predict(self, n: int) -> list[TransferKey]:
        out: list[TransferKey] = []
        for group in self._groups:
            for key in group:
                if len(out) >= n:
                    return out
                out.append(key)
        return out

    def peek(self) -> TransferKey | None:
        return self._groups[0][0] if self._groups else None

    def hint(self, keys: Sequence[TransferKey]) -> None:
        """Hints are not used: swap-ins are predicted from swap-outs."""

    def _swapped_out(self, swap_in: TransferKey) -> None:
        if swap_in in self._held:
            self._forget(swap_in)  # a host range rewritten by a newer swap-out returns with the newer group
        if not self._open or not self._groups:
            if len(self._groups) == self._groups.maxlen:  # appending drops the oldest group
                self._held.difference_update(self._groups[0])
            self._groups.append(deque())
            self._open = True
        self._groups[-1].append(swap_in)
        self._held.add(swap_in)

    def _swapped_in(self, key: TransferKey) -> None:
        """Consume `key`: within its group, the keys before it were skipped and are dropped too."""
        if key not in self._held:  # the common miss costs O(1), not a scan of every group
            return
        for index in range(len(self._groups) - 1, -1, -1):
            group = self._groups[index]
            if key in group:
                while (dropped := group.popleft()) != key:
                    self._held.discard(dropped)
                self._held.discard(key)
                if not group:
                    del self._groups[index]
                return

    def _forget(self, key: TransferKey) -> None:
        self._held.discard(key)
        for index in range(len(self._groups) - 1, -1, -1):
            group = self._groups[index]
            if key in group:
                group.remove(key)
                if not group:
                    del self._groups[index]
                    if index == len(self._groups):
                        self._open = False
                return
