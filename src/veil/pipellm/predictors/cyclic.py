"""Cyclic predictor: period detection over the transfer stream (weight streaming repeats every step).

The stream s[0], s[1], ... has period p at time t when s[t] == s[t-p] held for the last few
observations. The predictor keeps one hypothesis p and the length of its current run of matches. On a
mismatch it proposes new periods from the last few earlier occurrences of the key just seen, checks
each against a short window of history, and keeps the best. Every observation costs O(1) amortized:
a bounded ring of history, a per-key deque of recent positions, and a fixed-size check window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from veil.pipellm.keys import Direction, TransferKey
from veil.pipellm.predictors.base import Predictor


class CyclicPredictor(Predictor):
    """Predicts a repeating sequence of any period up to `max_period`, and re-learns when it changes.

    Args:
        max_period: longest period detected (weight streaming: chunks per model step).
        min_matches: consecutive confirmations needed before predicting (capped at the period itself).
        direction: only keys in this direction are observed and predicted (None: both).
        check_window: history positions compared when a new period is proposed.
        candidates: earlier occurrences of a key tried as period candidates on a mismatch.
    """

    def __init__(
        self,
        *,
        max_period: int = 4096,
        min_matches: int = 4,
        direction: Direction | None = Direction.H2D,
        check_window: int = 16,
        candidates: int = 4,
    ) -> None:
        if max_period < 1 or min_matches < 1 or check_window < 1 or candidates < 1:
            raise ValueError("max_period, min_matches, check_window and candidates must be >= 1")
        self._max_period = max_period
        self._min_matches = min_matches
        self._direction = direction
        self._window = check_window
        self._capacity = max_period + check_window + 1
        self._ring: list[TransferKey | None] = [None] * self._capacity
        self._seen: dict[TransferKey, deque[int]] = {}
        self._max_positions = candidates
        self._t = 0  # number of observations so far
        self._period: int | None = None
        self._run = 0  # consecutive t with s[t] == s[t - period]

    @property
    def period(self) -> int | None:
        """The confirmed period, or None while no period is confirmed."""
        if self._period is not None and self._run >= min(self._period, self._min_matches):
            return self._period
        return None

    def observe(self, key: TransferKey) -> None:
        if self._direction is not None and key.direction is not self._direction:
            return
        t = self._t
        if self._period is not None and self._at(t - self._period) == key:
            self._run += 1
        else:
            self._period, self._run = self._propose(key, t)
        self._ring[t % self._capacity] = key
        self._remember(key, t)
        self._t = t + 1

    def predict(self, n: int) -> list[TransferKey]:
        p = self.period
        if p is None or n <= 0:
            return []
        start = self._t - p  # the observation one period before the next one
        if start < 0 or start < self._t - self._capacity:
            return []
        if n <= p:  # the common case: part of one period (O(n), not O(period))
            return self._ring_range(start, start + n)
        period = self._ring_range(start, self._t)  # one whole period, oldest first
        repeats, rest = divmod(n, p)
        return period * repeats + period[:rest]

    def peek(self) -> TransferKey | None:
        p = self.period
        return None if p is None else self._at(self._t - p)

    def hint(self, keys: Sequence[TransferKey]) -> None:
        """Hints are not used: the cyclic pattern is learned from the stream alone."""

    def _ring_range(self, begin: int, end: int) -> list[TransferKey]:
        """Observations begin..end-1 (all within the ring) as a list, by slicing the ring."""
        lo, hi = begin % self._capacity, end % self._capacity
        if end - begin == self._capacity or (lo >= hi and end > begin):
            return self._ring[lo:] + self._ring[:hi]  # type: ignore[return-value]
        return self._ring[lo:hi]  # type: ignore[return-value]

    def _at(self, index: int) -> TransferKey | None:
        if index < 0 or index < self._t - self._capacity:
            return None
        return self._ring[index % self._capacity]

    def _propose(self, key: TransferKey, t: int) -> tuple[int | None, int]:
        """Best period ending at t (key at t, not yet stored) and its matched run length."""
        best: tuple[int | None, int] = (None, 0)
        for earlier in reversed(self._seen.get(key, ())):
            p = t - earlier
            if p > self._max_period:
                break
            run = 1
            while (
                run < self._window
                and self._at(t - run) is not None
                and self._at(t - run) == self._at(t - run - p)
            ):
                run += 1
            if run > best[1]:
                best = (p, run)
        return best

    def _remember(self, key: TransferKey, t: int) -> None:
        positions = self._seen.get(key)
        if positions is None:
            positions = self._seen[key] = deque(maxlen=self._max_positions)
        positions.append(t)
        if len(self._seen) > 4 * self._capacity:
            self._forget_old(t)

    def _forget_old(self, t: int) -> None:
        """Drop keys not seen within one ring of history (amortized O(1): runs once per ring of new keys)."""
        horizon = t - self._capacity
        self._seen = {k: pos for k, pos in self._seen.items() if pos[-1] > horizon}
