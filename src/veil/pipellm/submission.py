"""Which decided chunks go to the device together: one submission per run of commits.

A submission is one hand-over to the device side: one wake of the copy engine (the runtime's bounce
ring rings its bell once) and one fixed host cost (the simulator's `message_s`). A chunk sealed in the
caller has to be submitted on its own, right after its seal, or the copy would wait for the seal of
the next; a pre-sealed chunk committed at the next IV is ready at once, so a run of them can go
together. The rule, shared by the `pipellm` transport and the simulator so that both make the same
submissions for the same decisions:

- a `Commit` (pre-sealed, at the next IV, no NOPs) joins the open submission;
- the open submission is submitted when it holds `limit` chunks, before the messages of any other
  decision (NOPs, a chunk sealed now), before the caller waits for a sealing worker, and at the end
  of the transfer.

Submitting later never reorders anything: decisions are made in counter order and a submission holds
a run of consecutive counters, submitted before any later counter.
"""

from __future__ import annotations

from typing import Generic, TypeGuard, TypeVar

from veil.pipellm.decisions import Commit, Decision

T = TypeVar("T")

DEFAULT_SUBMIT_CHUNKS = 8  # `PipeLLMOptions.submit_chunks` and the simulator's default


class Submission(Generic[T]):
    """The open submission of one transfer: what each joining `Commit` needs sent (an item).

    Args:
        limit: chunks per submission (>= 1; 1: every chunk is submitted on its own).

    Raises:
        ValueError: if `limit` < 1.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._items: list[T] = []

    @staticmethod
    def joins(decision: Decision) -> TypeGuard[Commit]:
        """True if `decision` may wait in the open submission (a commit at the next IV)."""
        return isinstance(decision, Commit)

    def add(self, item: T) -> bool:
        """Gather a joining decision's item; True if the submission is now full (submit it)."""
        self._items.append(item)
        return len(self._items) >= self.limit

    def __len__(self) -> int:
        return len(self._items)

    def take(self) -> list[T]:
        """The gathered items, in counter order, leaving the submission empty."""
        items, self._items = self._items, []
        return items
