"""The generation loop: prefill a batch of prompts, then decode one token per row per step.

The loop drives a `Runner`: `Llama` itself (resident weights) or an engine with the same five methods,
such as the offloading engine that streams each layer's weights in just before it runs. Prompts enter
as token ids or, for split inference, as embeddings computed elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from veil.errors import UsageError
from veil.model.kv_cache import KVCache
from veil.model.llama import StepContext
from veil.model.sampling import Sampler, SamplingParams


class Runner(Protocol):
    """What the generation loop needs of a model: embed, per-step context, decoder stack, head, cache."""

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor: ...

    def context(
        self, batch_size: int, seq_len: int, cache: KVCache | None, pad: torch.Tensor | None = None
    ) -> StepContext: ...

    def run_layers(self, hidden: torch.Tensor, ctx: StepContext) -> torch.Tensor: ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def new_cache(self, batch_size: int, max_tokens: int) -> KVCache: ...


@dataclass(frozen=True)
class GenerationRequest:
    """A batch to generate for. Exactly one of `prompt_ids` and `prompt_embeds` is given."""

    max_new_tokens: int
    prompt_ids: Sequence[Sequence[int]] | None = None  # one list of token ids per row
    prompt_embeds: torch.Tensor | None = None  # (B, T, hidden), rows of equal length
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()  # a row stops after emitting any of these

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if (self.prompt_ids is None) == (self.prompt_embeds is None):
            raise UsageError("give exactly one of prompt_ids and prompt_embeds")
        if self.prompt_ids is not None and (
            not self.prompt_ids or any(len(row) == 0 for row in self.prompt_ids)
        ):
            raise UsageError("every prompt needs at least one token")


def stream(model: Runner, request: GenerationRequest) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) per step, until all rows stopped or the limit.

    Rows that already stopped keep yielding their stop token (callers cut at the first stop).
    """
    sampler = Sampler(request.params)
    hidden, pad = _prompt_hidden(model, request)
    batch, prompt_len, _ = hidden.shape
    cache = model.new_cache(batch, prompt_len + request.max_new_tokens)
    stops = torch.tensor(request.stop_token_ids or (-1,))
    done = torch.zeros(batch, dtype=torch.bool)
    with torch.inference_mode():
        for _ in range(request.max_new_tokens):
            ctx = model.context(batch, hidden.shape[1], cache, pad)
            logits = model.head(model.run_layers(hidden, ctx)[:, -1:])[:, 0]  # (B, vocab)
            cache.advance(hidden.shape[1])
            token = sampler(logits)
            token = torch.where(done, stops[0], token) if stops[0] >= 0 else token
            done |= torch.isin(token, stops)
            yield token
            if bool(done.all()):
                return
            hidden = model.embed(token[:, None])


def generate(model: Runner, request: GenerationRequest) -> list[list[int]]:
    """Generated token ids per row, each cut after its first stop token (which is kept)."""
    rows: list[list[int]] = [[] for _ in range(_batch_size(request))]
    finished = [False] * len(rows)
    stops = set(request.stop_token_ids)
    for step in stream(model, request):
        for row, token in enumerate(step.tolist()):
            if not finished[row]:
                rows[row].append(token)
                finished[row] = token in stops
    return rows


def _batch_size(request: GenerationRequest) -> int:
    if request.prompt_ids is not None:
        return len(request.prompt_ids)
    assert request.prompt_embeds is not None
    return request.prompt_embeds.shape[0]


def _prompt_hidden(model: Runner, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt hidden states (B, T, hidden) and left-padding counts (B,) or None when none is needed."""
    if request.prompt_embeds is not None:
        return request.prompt_embeds, None
    assert request.prompt_ids is not None
    longest = max(len(row) for row in request.prompt_ids)
    ids = torch.zeros(len(request.prompt_ids), longest, dtype=torch.long)
    pads = []
    for row, prompt in enumerate(request.prompt_ids):
        ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        pads.append(longest - len(prompt))
    pad = torch.tensor(pads) if any(pads) else None
    with torch.inference_mode():
        return model.embed(ids), pad
