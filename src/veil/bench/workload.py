"""Serving workloads from real text nobody here wrote, for `veil bench serve` and `veil bench kvswap`.

Prompts join 1 to `max_sentences` human-written movie-review sentences (Hutto & Gilbert, ICWSM 2014:
the data set `veil eval` already fetches) under a fixed instruction. Arrivals are Poisson at
`rate_per_s` (or all at once). Output lengths are exponential with mean `mean_output_tokens`, clipped
to [1, max_output_tokens]: the long tail of ShareGPT's outputs (the vLLM paper's means: 161 input, 338
output tokens) scaled to what a 2-core machine decodes in a minute. Every request generates exactly its
drawn length (stop tokens are ignored), so all systems compared do the same work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.eval.data import movie_reviews

_INSTRUCTION = "\nIn one paragraph, what does this reviewer think of the film, and why?"


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 32
    rate_per_s: float = 8.0  # Poisson arrival rate; 0 means every request arrives at time 0
    max_sentences: int = 2  # a prompt joins 1..max_sentences review sentences
    mean_output_tokens: int = 32  # mean of the exponential output-length distribution
    max_output_tokens: int = 128  # output lengths are clipped to [1, max_output_tokens]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.max_sentences < 1 or self.mean_output_tokens < 1:
            raise ValueError("num_requests, max_sentences and mean_output_tokens must be >= 1")
        if self.rate_per_s < 0 or self.max_output_tokens < 1:
            raise ValueError("rate_per_s must be >= 0 and max_output_tokens >= 1")


@dataclass(frozen=True)
class ServeRequest:
    arrival_s: float  # seconds after the start of the run
    prompt_token_ids: list[int]
    output_tokens: int  # tokens to generate, exactly
    adapter: str | None = None  # the LoRA adapter it runs with (None: the base model)


def make_workload(tokenizer: Any, spec: WorkloadSpec) -> list[ServeRequest]:
    """`spec.num_requests` requests in arrival order (seeded: the same spec gives the same requests)."""
    sentences = [example.text for example in movie_reviews()]
    rng = np.random.default_rng(spec.seed)
    gaps = rng.exponential(1.0 / spec.rate_per_s, spec.num_requests) if spec.rate_per_s else None
    arrivals = np.cumsum(gaps) if gaps is not None else np.zeros(spec.num_requests)
    requests = []
    for arrival in arrivals:
        picks = rng.choice(len(sentences), int(rng.integers(1, spec.max_sentences + 1)), replace=False)
        text = "Review: " + " ".join(sentences[i] for i in picks) + _INSTRUCTION
        output = int(np.clip(round(rng.exponential(spec.mean_output_tokens)), 1, spec.max_output_tokens))
        requests.append(ServeRequest(float(arrival), list(tokenizer(text).input_ids), output))
    return requests


def describe(requests: list[ServeRequest]) -> dict[str, float]:
    """Means of the workload, for the report."""
    return {
        "requests": len(requests),
        "mean_prompt_tokens": float(np.mean([len(r.prompt_token_ids) for r in requests])),
        "mean_output_tokens": float(np.mean([r.output_tokens for r in requests])),
        "max_output_tokens": max(r.output_tokens for r in requests),
        "last_arrival_s": max(r.arrival_s for r in requests),
    }
