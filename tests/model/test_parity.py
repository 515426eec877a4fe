"""veil's Llama against transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from veil.model.checkpoint import build_model
from veil.model.config import ModelConfig
from veil.model.generate import GenerationRequest, generate
from veil.model.llama import Llama

TOL = 1e-4

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 500000.0,
}


def tiny_pair(**overrides) -> tuple[LlamaForCausalLM, Llama]:
    torch.manual_seed(0)
    hf_config = LlamaConfig(**{**TINY, **overrides})
    hf = LlamaForCausalLM(hf_config).eval()
    ours = build_model(hf.state_dict(), ModelConfig.from_hf_dict(hf_config.to_dict()))
    return hf, ours


TINY_VARIANTS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    "llama3-rope": {"rope_parameters": LLAMA3_SCALING},
    "mha": {"num_key_value_heads": 4},
}


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_logits_match_transformers(variant: str) -> None:
    hf, ours = tiny_pair(**TINY_VARIANTS[variant])
    ids = torch.randint(0, TINY["vocab_size"], (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= TOL


def test_llama3_scaling_changes_the_model() -> None:
    """Guard against the scaling being silently ignored: with it, logits differ from plain RoPE."""
    _, plain = tiny_pair()
    _, scaled = tiny_pair(rope_parameters=LLAMA3_SCALING)
    assert scaled.config.rope_scaling is not None
    ids = torch.arange(120)[None] % TINY["vocab_size"]
    with torch.inference_mode():
        assert (plain(ids) - scaled(ids)).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", ["tied", "untied", "llama3-rope"])
def test_tiny_greedy_generation_matches_transformers(variant: str) -> None:
    hf, ours = tiny_pair(**TINY_VARIANTS[variant])
    prompt = [5, 17, 42, 8, 9]
    ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    got = generate(ours, GenerationRequest(max_new_tokens=24, prompt_ids=[prompt]))[0]
    assert got == ref


@pytest.fixture(scope="module")
def hf_bundled(bundled):
    return LlamaForCausalLM.from_pretrained(str(bundled.path), dtype=torch.float32).eval()


def test_bundled_logits_match_transformers(bundled, hf_bundled) -> None:
    text = "Confidential computing keeps data encrypted while it is being processed by the accelerator."
    ids = bundled.tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        diff = (bundled.model(ids) - hf_bundled(ids).logits).abs().max().item()
    assert diff <= TOL


def test_bundled_greedy_generation_matches_transformers(bundled, hf_bundled) -> None:
    prompts = ["The three primary colours are", "def fibonacci(n):"]
    for text in prompts:
        prompt = bundled.tokenizer(text).input_ids
        ref = hf_bundled.generate(
            torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
        got = generate(bundled.model, GenerationRequest(max_new_tokens=24, prompt_ids=[prompt]))[0]
        assert got == ref, text


def test_left_padded_batch_matches_transformers(bundled, hf_bundled) -> None:
    tok = bundled.tokenizer
    prompts = ["Hello", "A long time ago in a galaxy far, far away"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    ref = hf_bundled.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)[
        :, enc.input_ids.shape[1] :
    ].tolist()
    got = generate(
        bundled.model, GenerationRequest(max_new_tokens=12, prompt_ids=[tok(p).input_ids for p in prompts])
    )
    assert got == ref
