"""`veil bench model`'s timing of the engine's own layer path, which the simulator calibrates on."""

from __future__ import annotations

from engine.support import random_llama, tiny_config
from veil.bench.model import engine_layers
from veil.model.llama import Llama
from veil.sim.calibrate import EngineCompute


def _tiny() -> Llama:
    return random_llama(
        tiny_config(intermediate_size=128, num_kv_heads=4, max_position_embeddings=256)
    ).eval()


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
