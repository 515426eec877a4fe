"""Predictors of PipeLLM: the combination of several, and the default set.

`CompositePredictor` feeds every observation to each child and trusts most the child that has been
right most recently: children are ranked by their current streak of correct next-key predictions of
host-to-device transfers (ties keep the given order; a device-to-host observation scores no one), the
leader's predictions come first (the first child, by rank, that predicts anything: a periodic leader
repeats its period), and the others fill the rest with keys not yet named.
"""

from __future__ import annotations

from collections.abc import Sequence

from veil.pipellm.keys import Direction, TransferKey
from veil.pipellm.predictors.base import HintPredictor, Predictor
from veil.pipellm.predictors.cyclic import CyclicPredictor
from veil.pipellm.predictors.queue import QueuePredictor
from veil.pipellm.predictors.swap import SwapPredictor

__all__ = [
    "CompositePredictor",
    "CyclicPredictor",
    "HintPredictor",
    "Predictor",
    "QueuePredictor",
    "SwapPredictor",
    "default_predictor",
]


class CompositePredictor(Predictor):
    """Combines predictors; the one with the longest current streak of hits leads.

    Args:
        children: the predictors, in tie-break order (first wins a tie).
    """

    def __init__(self, children: Sequence[Predictor]) -> None:
        if not children:
            raise ValueError("CompositePredictor needs at least one child predictor")
        self._children = tuple(children)
        self._streaks = [0] * len(self._children)

    @property
    def children(self) -> tuple[Predictor, ...]:
        return self._children

    @property
    def streaks(self) -> tuple[int, ...]:
        """Each child's current run of correct next-key predictions."""
        return tuple(self._streaks)

    def observe(self, key: TransferKey) -> None:
        if key.direction is not Direction.H2D:  # predictions name host-to-device keys: nothing to score
            for child in self._children:
                child.observe(key)
            return
        streaks = self._streaks
        for i, child in enumerate(self._children):
            streaks[i] = streaks[i] + 1 if child.peek() == key else 0
            child.observe(key)

    def predict(self, n: int) -> list[TransferKey]:
        if n <= 0:
            return []
        order = sorted(range(len(self._children)), key=lambda i: (-self._streaks[i], i))
        out: list[TransferKey] = []
        named: set[TransferKey] = set()
        for i in order:
            keys = self._children[i].predict(n - len(out))
            if not out:  # the leader: the first child that predicts anything, repeats and all
                if len(keys) >= n:  # it fills the window on its own (the steady state)
                    return keys[:n]
                out.extend(keys)
                named.update(keys)
                continue
            for key in keys:
                if key not in named:
                    out.append(key)
                    named.add(key)
            if len(out) >= n:
                break
        return out[:n]

    def hint(self, keys: Sequence[TransferKey]) -> None:
        for child in self._children:
            child.hint(keys)


def default_predictor(*, max_period: int = 4096) -> CompositePredictor:
    """Hints, then cyclic (weights), swap (KV cache) and queue (adapters), combined.

    The queue predictor only predicts once its engine registers adapters; reach it through
    `children` (it is the last child).
    """
    return CompositePredictor(
        [HintPredictor(), CyclicPredictor(max_period=max_period), SwapPredictor(), QueuePredictor()]
    )
