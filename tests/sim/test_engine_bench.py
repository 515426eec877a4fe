"""`veil bench model`'s timing of the engine's own layer passes, and the compute model the simulator
calibrates on it (`EngineCompute`)."""

from __future__ import annotations

import pytest

from engine.support import random_llama, tiny_config
from veil.bench.model import EnginePoint, engine_layers
from veil.model.llama import Llama
from veil.sim.calibrate import EngineCompute, LayerCurve
from veil.trace import Compute


def _tiny() -> Llama:
    return random_llama(
        tiny_config(intermediate_size=128, num_kv_heads=4, max_position_embeddings=256)
    ).eval()


def test_engine_layers_time_decode_prefill_and_adapter_passes_and_feed_the_compute_model() -> None:
    points = (EnginePoint(1, 8, 3), EnginePoint(2, 8, 3), EnginePoint(2, 32, 2), EnginePoint(2, 8, 3, 2))
    layers = engine_layers(_tiny(), [5, 6, 7], points)
    assert all(row["seconds"] > 0 and row["spans"] >= 1 for row in layers)
    # every pass of every layer is counted: 2 layers x (1 prefill + 2 decode steps) per point but the
    # third's, 2 x (1 + 1); the two adapters' rows share one pass (one batch per step)
    assert sum(row["spans"] for row in layers) == 2 * 3 + 2 * 3 + 2 * 2 + 2 * 3
    assert {row["adapters"] for row in layers} == {0, 2}
    base = sorted(row["flops"] for row in layers if row["adapters"] == 0)
    # a 64-token prefill pass costs more FLOPs than a batch-1 decode one, by about the token ratio
    assert base[-1] > 32 * base[0]
    # the same 2 rows on two adapters: each pass counts the adapters' matmuls beyond the base model's
    for tokens in (16, 2):  # the prefill (2 x 8 tokens), the decodes
        flops = {row["adapters"]: row["flops"] for row in layers if row["tokens"] == tokens}
        assert flops[2] > flops[0]
    compute = EngineCompute.from_layers(layers)
    assert compute.seconds(base[0]) > 0 and compute.seconds(2 * base[-1]) > compute.seconds(base[-1])


def test_a_layer_curve_interpolates_the_measured_passes() -> None:
    rows = [
        {"flops": 1e7, "nbytes": 0.0, "seconds": 0.002},
        {"flops": 5e7, "nbytes": 0.0, "seconds": 0.006, "spans": 1},
        {"flops": 5.1e7, "nbytes": 0.0, "seconds": 0.0075, "spans": 3},  # within 5%: one point, 7.125 ms
        {"flops": 5e8, "nbytes": 0.0, "seconds": 0.025},
    ]
    curve = LayerCurve.from_rows(rows)
    assert curve(1e6) == pytest.approx(0.002)  # below the cheapest: its seconds
    assert curve(3.0375e7) == pytest.approx(0.0045625)  # halfway between 2 ms and 7.125 ms
    assert curve(1e9) == pytest.approx(0.05)  # above the costliest: at its FLOP rate
    with pytest.raises(ValueError):
        LayerCurve((2.0, 1.0), (1.0, 1.0))


def test_engine_compute_times_a_pass_by_its_adapters() -> None:
    rows = [
        {"flops": 1e7, "seconds": 0.002, "adapters": 0},
        {"flops": 1e8, "seconds": 0.010, "adapters": 0},
        {"flops": 1e7, "seconds": 0.003, "adapters": 1},
        {"flops": 1e8, "seconds": 0.012, "adapters": 1},
    ]
    compute = EngineCompute.from_layers(rows)
    assert compute.seconds(1e7) == pytest.approx(0.002)
    assert compute.seconds(1e7, adapters=1) == pytest.approx(0.003)
    # two adapters were not measured: one's curve plus what the one added to the base model
    assert compute.seconds(1e8, adapters=2) == pytest.approx(0.014)
    span = Compute(flops=1e8, nbytes=0.0, seconds=1.0, needs=0, tokens=4, adapters=1)
    assert compute(span) == pytest.approx(0.012)  # a trace's span, by its FLOPs and adapters
    with pytest.raises(ValueError, match="0 adapters"):
        EngineCompute({1: LayerCurve((1.0,), (1.0,))})
