"""Sampling: greedy, temperature, top-k, top-p, seeds; and the generation loop's contract."""

from __future__ import annotations

import pytest
import torch

from veil.errors import UsageError
from veil.model.generate import GenerationRequest, generate
from veil.model.sampling import Sampler, SamplingParams

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def draw(params: SamplingParams, n: int) -> torch.Tensor:
    sampler = Sampler(params)
    return torch.cat([sampler(LOGITS) for _ in range(n)])


def test_greedy_is_argmax() -> None:
    assert draw(SamplingParams(), 5).tolist() == [0] * 5


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    a = draw(SamplingParams(temperature=1.0, seed=7), 200)
    b = draw(SamplingParams(temperature=1.0, seed=7), 200)
    c = draw(SamplingParams(temperature=1.0, seed=8), 200)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_temperature_sampling_follows_softmax() -> None:
    n = 20000
    counts = torch.bincount(draw(SamplingParams(temperature=1.0, seed=1), n), minlength=6).float()
    expected = torch.softmax(LOGITS[0], dim=-1) * n
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def test_top_k_keeps_only_k_tokens() -> None:
    seen = set(draw(SamplingParams(temperature=5.0, top_k=2, seed=3), 500).tolist())
    assert seen == {0, 1}


def test_top_p_keeps_the_nucleus() -> None:
    probs = torch.softmax(LOGITS[0], dim=-1)  # about 0.54, 0.20, 0.12, ...
    seen = set(draw(SamplingParams(temperature=1.0, top_p=0.7, seed=4), 2000).tolist())
    assert seen == {0, 1}
    assert probs[0] < 0.7 <= probs[0] + probs[1]
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.01, seed=4), 100).tolist()) == {0}


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_params_rejected(kwargs) -> None:
    with pytest.raises(UsageError):
        SamplingParams(**kwargs)


def test_request_validation() -> None:
    with pytest.raises(UsageError):
        GenerationRequest(max_new_tokens=-1, prompt_ids=[[1]])
    with pytest.raises(UsageError):
        GenerationRequest(max_new_tokens=1, prompt_ids=[[]])
    with pytest.raises(UsageError):
        GenerationRequest(max_new_tokens=1)


def test_generation_from_embeddings_equals_from_ids(bundled) -> None:
    ids = bundled.tokenizer("Embeddings computed by the client").input_ids
    with torch.inference_mode():
        embeds = bundled.model.embed(torch.tensor([ids]))
    a = generate(bundled.model, GenerationRequest(max_new_tokens=8, prompt_ids=[ids]))
    b = generate(bundled.model, GenerationRequest(max_new_tokens=8, prompt_embeds=embeds))
    assert a == b


def test_stop_token_ends_the_row(bundled) -> None:
    ids = bundled.tokenizer("1, 2, 3,").input_ids
    free = generate(bundled.model, GenerationRequest(max_new_tokens=6, prompt_ids=[ids]))[0]
    stop = free[2]
    stopped = generate(
        bundled.model, GenerationRequest(max_new_tokens=6, prompt_ids=[ids], stop_token_ids=(stop,))
    )[0]
    assert stopped == free[: free.index(stop) + 1]
