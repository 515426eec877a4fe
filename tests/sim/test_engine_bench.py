"""`veil bench model`'s timing of the engine's own layer path, which the simulator calibrates on."""

from __future__ import annotations

import torch

from veil.bench.model import engine_layers
from veil.model.config import ModelConfig
from veil.model.llama import Llama
from veil.sim.calibrate import EngineCompute


def _tiny() -> Llama:
    config = ModelConfig(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=4, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None, eos_token_ids=(0,),
    )  # fmt: skip
    llama = Llama(config)
    with torch.no_grad():
        for param in llama.parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    return llama.eval()


def test_engine_layers_cover_decode_and_prefill_costs_and_feed_the_compute_model() -> None:
    points = ((1, 8, 3), (4, 8, 3), (2, 32, 2))  # decode at batch 1 and 4; prefills of 8-64 tokens
    layers = engine_layers(_tiny(), [5, 6, 7], points)
    flops = [row["flops"] for row in layers]
    assert flops == sorted(flops) and all(row["seconds"] > 0 and row["spans"] >= 1 for row in layers)
    # every layer pass is counted: 2 layers x (1 prefill + 2 decode steps) per point, 2 x (1 + 1) last
    assert sum(row["spans"] for row in layers) == 2 * 3 + 2 * 3 + 2 * 2
    # a 64-token prefill layer costs more FLOPs than a batch-1 decode one, by about the token ratio
    assert flops[-1] > 32 * flops[0]
    compute = EngineCompute.from_layers(layers)
    assert compute(flops[0]) > 0 and compute(2 * flops[-1]) > compute(flops[-1])
