"""A request as the scheduler sees it: prompt, generated tokens, sampling parameters, progress.

No torch here: a `Sequence` is plain data the scheduler moves between its queues. `num_computed_tokens`
counts the tokens whose keys and values sit in the KV cache; the tokens after it are what the next
forward pass must compute (the whole prompt at first, then one generated token per step).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from veil.model.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted by recompute: holds no blocks
    RUNNING = "running"  # its blocks are on the device
    SWAPPED = "swapped"  # preempted by swapping: its blocks are in the host swap space
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # emitted a stop token
    LENGTH = "length"  # reached max_tokens
    ABORT = "abort"  # aborted by the caller


@dataclass(eq=False)
class Sequence:
    """One request in flight. `stop_token_ids` is resolved (the model's EOS filled in) by the engine."""

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    adapter: str | None = None  # the LoRA adapter this request runs with (None: the base model)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the cache does not hold yet: prompt (or prompt + output after a recompute) or one."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_num_tokens(self) -> int:
        """Tokens whose keys and values the cache ever holds: the last generated token is never fed."""
        return len(self.prompt_token_ids) + self.params.max_tokens - 1

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Token ids of positions [start, stop) over prompt then output."""
        prompt_len = len(self.prompt_token_ids)
        head = self.prompt_token_ids[start:stop]
        return head + self.output_token_ids[max(start - prompt_len, 0) : max(stop - prompt_len, 0)]

    def append(self, token_id: int) -> None:
        """Record a generated token and finish if it is a stop token or the last one allowed."""
        self.output_token_ids.append(token_id)
        if token_id in self.stop_token_ids:
            self.finish(FinishReason.STOP)
        elif len(self.output_token_ids) >= self.params.max_tokens:
            self.finish(FinishReason.LENGTH)

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
