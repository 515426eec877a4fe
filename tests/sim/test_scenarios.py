"""The paper's workloads as traces (FlexGen, vLLM KV swapping, adapter swapping), their replay under
the three modes, misprediction injection, scaling, the paper rows and the calibrated machine profile."""

from __future__ import annotations

import dataclasses

import pytest

from veil.pipellm import MiB
from veil.sim import HardwareProfile, ModelProfile
from veil.sim.calibrate import HostRates, ModelShape, machine_profile
from veil.sim.cores import Lane, OneSpeed, PairSpeeds, host_cores
from veil.sim.hardware import GB, MODELS
from veil.sim.paper import MODELS_OF, paper_rows
from veil.sim.replay import Mode, ReplayOptions, inject_mispredictions, replay, scale_trace
from veil.sim.scenarios import (
    Workload,
    adapter_bytes,
    adapter_trace,
    device_kv_blocks,
    flexgen_offload_fraction,
    kvswap_trace,
    offload_trace,
)
from veil.trace import Op

# A small model on a small device: 4 MiB KV blocks, a few hundred of them, so requests get preempted.
SMALL = ModelProfile(
    "small", layers=8, hidden=1024, intermediate=4096, kv_dim=1024, params_per_layer=12 * 1024**2
)
HW = HardwareProfile("test", gpu_memory_bytes=0.6 * GB, spare_cores=8)
SERVE = Workload(batch=64, steps=60, requests=120, adapters=16, slots=2, rank=16)


@pytest.fixture(scope="module")
def kv_trace():
    return kvswap_trace(SMALL, HW, SERVE)


def test_kv_swapping_swaps_blocks_out_and_back(kv_trace) -> None:
    block = 16 * SMALL.kv_bytes_per_token
    outs, ins = kv_trace.transfers(Op.D2H), kv_trace.transfers(Op.H2D)
    assert outs and ins and all(t.nbytes == block for t in outs + ins)
    assert {t.source_id for t in ins} <= {t.source_id for t in outs}
    assert kv_trace.transfers(Op.HINT)  # the engine names the next swap-in's blocks
    assert kvswap_trace(SMALL, HW, SERVE).to_json() == kv_trace.to_json()  # seeded


def test_kv_swapping_refuses_a_device_too_small() -> None:
    with pytest.raises(ValueError, match="too few"):
        kvswap_trace(SMALL, dataclasses.replace(HW, gpu_memory_bytes=0.25 * GB), SERVE)


@pytest.mark.parametrize("workload", ["kvswap", "lora"])
def test_modes_are_ordered_and_enough_cores_hide_sealing(workload: str, kv_trace) -> None:
    trace = kv_trace if workload == "kvswap" else adapter_trace(SMALL, HW, SERVE)
    # adapters load as requests are admitted: mostly in the first steps of a run this short
    options = ReplayOptions(warmup_steps=5 if workload == "kvswap" else 0, chunk_bytes=4 * MiB)
    plain, cc = (replay(trace, HW, m, options).tokens_per_s for m in (Mode.PLAIN, Mode.CC))
    few = replay(trace, dataclasses.replace(HW, spare_cores=1), Mode.PIPELLM, options)
    many = replay(trace, dataclasses.replace(HW, spare_cores=64), Mode.PIPELLM, options)
    assert plain > cc and plain >= many.tokens_per_s * (1 - 1e-9)
    assert many.tokens_per_s >= few.tokens_per_s >= cc * 0.99
    assert many.stats is not None and (workload == "lora" or many.stats.hits > 0)  # lora: 2 unhinted loads


def test_injected_mispredictions_cost_hits_and_throughput(kv_trace) -> None:
    options = ReplayOptions(warmup_steps=5, chunk_bytes=4 * MiB)
    clean = replay(kv_trace, HW, Mode.PIPELLM, options)
    noisy = replay(inject_mispredictions(kv_trace, 0.3, seed=2), HW, Mode.PIPELLM, options)
    assert clean.stats is not None and noisy.stats is not None
    assert noisy.stats.hits < clean.stats.hits
    assert noisy.tokens_per_s < clean.tokens_per_s
    with pytest.raises(ValueError):
        inject_mispredictions(kv_trace, 1.5)


def test_scaling_a_trace_scales_its_transfers(kv_trace) -> None:
    bigger = scale_trace(kv_trace, bytes_factor=2.0, flops_factor=1.0)
    assert sum(t.nbytes for t in bigger.transfers()) == pytest.approx(
        2 * sum(t.nbytes for t in kv_trace.transfers()), rel=1e-6
    )
    options = ReplayOptions(warmup_steps=5, chunk_bytes=4 * MiB)
    assert (
        replay(bigger, HW, Mode.CC, options).tokens_per_s
        < replay(kv_trace, HW, Mode.CC, options).tokens_per_s
    )


def test_adapters_load_on_demand_with_queue_hints() -> None:
    trace = adapter_trace(SMALL, HW, SERVE)
    loads = trace.transfers(Op.H2D)
    assert loads and all(t.nbytes == adapter_bytes(SMALL, SERVE.rank) for t in loads)
    assert trace.transfers(Op.HINT)
    # Llama-2-7B, rank 16 on q, k, v, o: 32 layers x 16 x 4 x (4096 + 4096) x 2 bytes
    assert adapter_bytes(MODELS["llama-2-7b"], 16) == 32 * 16 * 4 * 8192 * 2


def test_flexgen_streams_what_its_policy_keeps_on_the_cpu_and_what_does_not_fit() -> None:
    hw = HardwareProfile("h100")
    assert (
        flexgen_offload_fraction(MODELS["opt-13b"], hw, Workload()) == 1.0
    )  # assumed: all weights on the CPU
    on_gpu = Workload(weights_gpu_share=1.0)  # the KV cache is on the CPU: 26 GB of weights fit
    assert flexgen_offload_fraction(MODELS["opt-13b"], hw, on_gpu) == 0.0
    assert 0.4 < flexgen_offload_fraction(MODELS["opt-66b"], hw, on_gpu) < 0.6  # 132 GB in 72
    assert flexgen_offload_fraction(MODELS["opt-30b"], hw, Workload(weights_gpu_share=0.2)) == pytest.approx(
        0.8
    )
    assert device_kv_blocks(MODELS["opt-66b"], hw) == 0  # 130 GB of weights do not fit in 80 GB


def test_offload_trace_is_flexgens_schedule_over_every_layer() -> None:
    w = Workload(batch=16, gpu_batch_size=8, steps=2, prompt_tokens=64, output_tokens=8)
    trace = offload_trace(SMALL, HW, w)
    weights = [t for t in trace.transfers(Op.H2D) if t.source_id < SMALL.layers]
    assert len(weights) == 1 + 2 * SMALL.layers  # the prologue, then every layer each step
    assert sum(s.tokens for s in trace.steps) == 2 * 16
    assert trace.transfers(Op.D2H)  # q and the new K, V of every GPU batch go to the CPU


def test_paper_rows_cover_every_workload_and_model() -> None:
    small = {name: SMALL for names in MODELS_OF.values() for name in names}
    small_workloads = {"offload": Workload(batch=8, steps=2), "kvswap": SERVE, "lora": SERVE}
    rows = paper_rows(small, HW, small_workloads, core_steps=(1, 64), batch_account=(8,))
    assert {(r.workload, r.model) for r in rows} == {(w, m) for w, ms in MODELS_OF.items() for m in ms}
    for r in rows:
        assert -1e-9 <= r.pipellm_overhead <= r.cc_drop + 1e-9 < 1
        assert (r.paper_cc_drop is not None) == (r.workload == "offload" and r.model != "opt-175b")
        assert "paper_cc_drop" in r.to_json() or r.paper_cc_drop is None
        assert ("cc_drop_by_batch" in r.detail) == (r.workload == "offload")


def test_machine_profile_fits_the_model_benchmark_and_the_core_rates() -> None:
    shape = ModelShape(params=100_000_000)  # 400 MB of fp32 weights
    rates = HostRates.from_gbps({"seal": 2.0, "open": 2.5, "copy": 5.0, "parallel": 1.6}, cores=2)
    bench = {"batch": {"1": {"veil_tokens_per_s": 10.0}, "8": {"veil_tokens_per_s": 40.0}}}
    hw = machine_profile(rates, bench, shape)
    assert hw.hbm_bytes_per_s == pytest.approx(4e9)  # 400 MB in 0.1 s
    assert hw.gpu_flops == pytest.approx(2 * 1e8 * 8 / 0.2)  # batch 8: 0.2 s, slower than memory allows
    assert hw.compute_seconds(*shape.step_cost(1)) == pytest.approx(0.1)
    assert hw.compute_seconds(*shape.step_cost(8)) == pytest.approx(0.2)
    assert hw.compute_on_host and not hw.duplex and (hw.host_cores, hw.host_parallel) == (2, 1.6)
    gb = 1e9  # 1 GB: the host seals and copies it, the copy engine opens and copies it twice
    assert gb / hw.seal_bytes_per_s == pytest.approx(1 / 2.0 + 1 / 5.0)
    device_side = gb / hw.pcie_h2d_bytes_per_s + gb / hw.device_crypto_bytes_per_s
    assert device_side == pytest.approx(1 / 2.5 + 2 / 5.0)
    assert hw.host_pairs is None and isinstance(host_cores(hw).sharing, OneSpeed)  # not measured


def test_measured_pair_factors_calibrate_the_shared_cores() -> None:
    kinds = ("compute", "seal", "open", "copy")
    factors = {a: {b: 0.5 if "seal" in (a, b) else 0.9 for b in kinds} for a in kinds}
    figures = {"seal": 2.0, "open": 2.5, "copy": 5.0, "parallel": 1.3, "contention": factors}
    bench = {"batch": {"1": {"veil_tokens_per_s": 10.0}, "8": {"veil_tokens_per_s": 40.0}}}
    hw = machine_profile(HostRates.from_gbps(figures, cores=2), bench, ModelShape(params=100_000_000))
    assert hw.host_pairs == factors
    cores = host_cores(hw)
    assert cores is not None and isinstance(cores.sharing, PairSpeeds)
    assert cores.aggregate([Lane.COMPUTE, Lane.COPY]) == pytest.approx(1.8)
    assert cores.aggregate([Lane.COMPUTE, Lane.SEAL]) == pytest.approx(1.0)


def test_a_decryption_pool_shortens_what_swap_ins_wait_for(kv_trace) -> None:
    hw = dataclasses.replace(HW, spare_cores=64)
    options = ReplayOptions(warmup_steps=5, chunk_bytes=4 * MiB)
    one, pool = (
        replay(kv_trace, hw, Mode.PIPELLM, dataclasses.replace(options, decrypt_threads=n)) for n in (1, 8)
    )
    plain = replay(kv_trace, hw, Mode.PLAIN, options).tokens_per_s
    assert one.tokens_per_s < pool.tokens_per_s <= plain * (1 + 1e-9)
    with pytest.raises(ValueError, match="decrypt_threads"):
        replay(kv_trace, hw, Mode.PIPELLM, dataclasses.replace(options, decrypt_threads=0))


def test_a_layer_time_model_replaces_the_roofline_in_a_replay(kv_trace) -> None:
    options = ReplayOptions(warmup_steps=5, chunk_bytes=4 * MiB, host_spans=False)
    slow = dataclasses.replace(options, layer_seconds=lambda span: 0.01)
    fast = dataclasses.replace(options, layer_seconds=lambda span: 0.001)
    slow_tps, fast_tps = (replay(kv_trace, HW, Mode.PLAIN, o).tokens_per_s for o in (slow, fast))
    assert slow_tps < fast_tps
