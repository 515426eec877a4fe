"""Profiles: public model sizes and the roofline of one decode layer."""

from __future__ import annotations

import dataclasses

import pytest

from veil.sim import H100_SXM_PCIE5, MODELS, decode_layer_seconds

# Decoder-layer parameters (embeddings excluded) of the published models, in billions.
NOMINAL_B = {
    "opt-13b": 12.6,
    "opt-30b": 29.6,
    "opt-66b": 65.2,
    "opt-175b": 174.0,
    "llama-2-7b": 6.5,
    "llama-2-13b": 12.7,
    "llama-2-70b": 68.5,
}


@pytest.mark.parametrize("name", sorted(NOMINAL_B))
def test_model_sizes_match_the_published_architectures(name: str) -> None:
    model = MODELS[name]
    assert model.layers * model.params_per_layer / 1e9 == pytest.approx(NOMINAL_B[name], rel=0.02)


def test_decode_layer_is_memory_bound_at_small_batch_and_compute_bound_at_large() -> None:
    model = MODELS["opt-30b"]
    weights_s = model.layer_bytes / (H100_SXM_PCIE5.hbm_bytes_per_s * H100_SXM_PCIE5.hbm_efficiency)
    assert decode_layer_seconds(model, H100_SXM_PCIE5, batch=1, context_tokens=0) == pytest.approx(weights_s)
    big = decode_layer_seconds(model, H100_SXM_PCIE5, batch=4096, context_tokens=0)
    assert big > 10 * weights_s


def test_vaes_seals_faster() -> None:
    assert dataclasses.replace(H100_SXM_PCIE5, vaes=True).seal_bytes_per_s > H100_SXM_PCIE5.seal_bytes_per_s
