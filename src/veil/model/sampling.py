"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from veil.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and (for the serving engine) when to stop.

    `temperature == 0` is greedy (argmax); top_k, top_p and seed then do nothing. `max_tokens` and
    `stop_token_ids` are read by `veil.engine`; the batch loop of `veil.model.generate` takes its limits
    from its `GenerationRequest` instead.
    """

    temperature: float = 0.0  # softmax temperature; 0 means greedy
    top_k: int = 0  # keep only the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1.0 keeps all
    seed: int | None = None  # seed of the sampling generator; None draws one from the OS
    max_tokens: int = 16  # tokens to generate at most (engine)
    stop_token_ids: tuple[int, ...] | None = None  # stop after any of these (kept); None: the model's EOS

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Stateful sampler: owns the random generator so a seeded generation is reproducible."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator = torch.Generator()
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids (B,) from last-position logits (B, vocab)."""
        if self.params.greedy:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.params.temperature
        if self.params.top_k:
            kth = torch.topk(scores, min(self.params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.params.top_p < 1.0:
            scores = _top_p_filter(scores, self.params.top_p)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(-1)


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach top_p; the first token always stays.
    drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
