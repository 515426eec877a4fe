"""What a preemption costs, measured as the engine runs: the policy that picks swap or recompute.

Under confidential computing a swap pays sealing both ways (out, and back in) and a recompute pays
compute (the victim's tokens prefilled again). Which is cheaper depends on the machine, the transport
and the model, so `PreemptionMode.AUTO` asks a `PreemptionCosts` per preemption; `MeasuredCosts`
answers from the engine's own steps:

- seconds per block moved one way: a step's swap time over the blocks it moved (out plus in);
- seconds per prefilled token: a step's forward time over its tokens, from steps that are mostly
  prefill (a decode token costs more per token on a CPU, so decode-heavy steps would overstate it).

Both are exponentially weighted moving averages. Until both are known the answer is "swap": the first
swaps measure the swap cost, and every request's first prefill measures the other. Pure: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PREFILL_SHARE = 0.5  # a step informs the prefill cost when at least this share of its tokens prefill


class PreemptionCosts(Protocol):
    def prefer_swap(self, blocks: int, tokens: int) -> bool:
        """Whether swapping `blocks` out and back beats prefilling `tokens` again."""
        ...


@dataclass
class MeasuredCosts:
    """Running estimates of both costs (see the module docstring)."""

    alpha: float = 0.2  # weight of the newest measurement
    swap_s_per_block: float | None = None  # one way
    prefill_s_per_token: float | None = None
    swaps_chosen: int = 0
    recomputes_chosen: int = 0

    def record_swap(self, blocks: int, seconds: float) -> None:
        if blocks > 0:
            self.swap_s_per_block = self._blend(self.swap_s_per_block, seconds / blocks)

    def record_forward(self, prefill_tokens: int, tokens: int, seconds: float) -> None:
        if tokens > 0 and prefill_tokens >= PREFILL_SHARE * tokens:
            self.prefill_s_per_token = self._blend(self.prefill_s_per_token, seconds / tokens)

    def swap_cost_s(self, blocks: int) -> float | None:
        return None if self.swap_s_per_block is None else 2 * blocks * self.swap_s_per_block

    def recompute_cost_s(self, tokens: int) -> float | None:
        return None if self.prefill_s_per_token is None else tokens * self.prefill_s_per_token

    def prefer_swap(self, blocks: int, tokens: int) -> bool:
        swap, recompute = self.swap_cost_s(blocks), self.recompute_cost_s(tokens)
        choice = swap is None or recompute is None or swap <= recompute
        if choice:
            self.swaps_chosen += 1
        else:
            self.recomputes_chosen += 1
        return choice

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new
