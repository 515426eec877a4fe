"""A tiny random Llama for tests where the real model is not the point (engine, simulator, eval)."""

from __future__ import annotations

import torch

from veil.model.config import ModelConfig
from veil.model.llama import Llama


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_ids=(0,),
    )
    return ModelConfig(**(fields | overrides))


def random_llama(config: ModelConfig, seed: int = 0, std: float = 0.2) -> Llama:
    model = Llama(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model
