"""The predictor contract, and the predictor of explicit hints.

A predictor watches the stream of bulk transfers and names the ones it expects next. Predictors are
pure: no threads, no clock, no I/O; the same object runs in the transport and in the simulator.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence

from veil.pipellm.keys import TransferKey


class Predictor(ABC):
    """Observes transfers in request order and predicts the next ones.

    Contract:
        - `observe(key)` is called once per bulk transfer, in the order the transfers happen, in both
          directions (a predictor ignores what it does not model).
        - `predict(n)` returns up to `n` keys expected next, nearest first; it does not change state.
          Repeated keys are allowed (a period-1 stream predicts the same key n times).
        - `hint(keys)` passes explicit knowledge from an engine ("these come next, in this order").
          Predictors must work without hints; one that cannot use them ignores them.
    """

    @abstractmethod
    def observe(self, key: TransferKey) -> None:
        """Record that `key` was just transferred."""

    @abstractmethod
    def predict(self, n: int) -> list[TransferKey]:
        """Up to `n` keys expected next, nearest first."""

    def hint(self, keys: Sequence[TransferKey]) -> None:  # noqa: B027 - optional, default ignores
        """Explicit upcoming transfers, in order. The default ignores them."""

    def peek(self) -> TransferKey | None:
        """The next key expected (`predict(1)`'s only key), or None; predictors may make it cheaper."""
        guess = self.predict(1)
        return guess[0] if guess else None


class HintPredictor(Predictor):
    """Predicts exactly what the engine hinted, in order, and forgets hints once they are consumed.

    An observed key that matches a pending hint consumes it and every hint before it (those were
    skipped). A key that matches no hint leaves the hints alone. At most `max_hints` are kept; older
    hints beyond that are dropped first.
    """

    def __init__(self, *, max_hints: int = 4096) -> None:
        if max_hints < 1:
            raise ValueError(f"max_hints must be >= 1, got {max_hints}")
        self._hints: deque[TransferKey] = deque(maxlen=max_hints)

    def __len__(self) -> int:
        return len(self._hints)

    def hint(self, keys: Sequence[TransferKey]) -> None:
        self._hints.extend(keys)

    def clear(self) -> None:
        """Forget every pending hint."""
        self._hints.clear()

    def observe(self, key: TransferKey) -> None:
        if key not in self._hints:
            return
        while self._hints.popleft() != key:
            pass

    def predict(self, n: int) -> list[TransferKey]:
        return list(itertools.islice(self._hints, max(n, 0)))

    def peek(self) -> TransferKey | None:
        return self._hints[0] if self._hints else None
