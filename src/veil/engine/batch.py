"""Throughput-oriented generation of many prompts through one (offloaded) runner, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from veil.model.generate import GenerationRequest, Runner, generate
from veil.model.sampling import SamplingParams

Progress = Callable[[int, int], None]  # (prompts done, prompts in all)


def generate_many(
    runner: Runner,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_token_ids: tuple[int, ...] = (),
    progress: Progress | None = None,
) -> list[list[int]]:
    """Generated token ids for every prompt, in prompt order, `batch_size` prompts at a time.

    Prompts are grouped by length first (longest first), so a batch carries little left padding;
    the same runner serves every batch, so an offloaded model keeps streaming its layers in the same
    cyclic order from one batch to the next (a speculative transport keeps its learned pattern).

    Raises:
        UsageError: on a bad batch size or an empty prompt (from `GenerationRequest`).
        ValueError: if `batch_size` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        request = GenerationRequest(
            max_new_tokens=max_new_tokens,
            prompt_ids=[prompts[i] for i in rows],
            params=params or SamplingParams(),
            stop_token_ids=stop_token_ids,
        )
        for row, tokens in zip(rows, generate(runner, request)):
            outputs[row] = tokens
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return outputs
