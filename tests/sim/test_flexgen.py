"""FlexGen's policy in the simulator: KV cache and hidden states on the CPU, CPU attention, GPU
batches sharing a weight load, and what crosses PCIe (sealed under cc) because of them."""

from __future__ import annotations

import dataclasses

import pytest

from veil.pipellm import MiB
from veil.sim import HardwareProfile, Mode, ModelProfile, Scenario, layout, simulate
from veil.sim.hardware import GB, cpu_attention_seconds
from veil.sim.replay import ReplayOptions, replay
from veil.sim.scenarios import Workload, flexgen_policy
from veil.sim.simulator import KV_SOURCE, FlexGenPolicy, flexgen_trace
from veil.trace import Compute, Op, TraceRecorder

# 6 MiB of weights per layer; width 512, so a GPU batch's per-token transfers are a few KiB.
SMALL = ModelProfile("small", layers=4, hidden=512, intermediate=2048, kv_dim=512, params_per_layer=3 * 2**20)
HW = HardwareProfile("test", spare_cores=8)
CONTEXT = 2048  # CPU attention of a GPU batch of 16: 16 x 2048 x 512 x 20 B at 100 GB/s = 3.4 ms


def cpu_policy(gpu_batches: int = 2, **kw: bool) -> FlexGenPolicy:
    return FlexGenPolicy(16, gpu_batches, **{"cache_on_cpu": True, "acts_on_cpu": True, **kw})


def scenario(policy: FlexGenPolicy, **kw: object) -> Scenario:
    return Scenario(SMALL, HW, policy.batch, context_tokens=CONTEXT, policy=policy, warmup_steps=12, **kw)  # type: ignore[arg-type]


def layer_s(sc: Scenario, mode: Mode) -> float:
    return simulate(sc, mode).layer_s


def test_cpu_attention_is_memory_bound_and_linear_in_batch_and_context() -> None:
    one = cpu_attention_seconds(SMALL, HW, batch=16, context_tokens=CONTEXT)
    assert one == pytest.approx(16 * CONTEXT * 512 * 20 / (100 * GB))
    assert cpu_attention_seconds(SMALL, HW, batch=32, context_tokens=CONTEXT) == pytest.approx(2 * one)
    faster = dataclasses.replace(HW, cpu_attention_bytes_per_s=200 * GB)
    assert cpu_attention_seconds(SMALL, faster, batch=16, context_tokens=CONTEXT) == pytest.approx(one / 2)


def test_with_cpu_attention_a_larger_batch_makes_the_step_longer_on_the_cpu() -> None:
    # the host runs each GPU batch's attention in turn: twice the batches, about twice the layer
    two, four = (layer_s(scenario(cpu_policy(n)), Mode.PLAIN) for n in (2, 4))
    attention = cpu_attention_seconds(SMALL, HW, batch=16, context_tokens=CONTEXT)
    assert two >= 2 * attention and four >= 4 * attention
    assert four == pytest.approx(2 * two, rel=0.1)
    # with the cache on the GPU the same batches cost a fraction of that
    resident = layer_s(scenario(FlexGenPolicy(16, 4)), Mode.PLAIN)
    assert resident < four / 4


def test_cpu_attention_moves_q_and_new_kv_down_and_the_output_up_each_layer() -> None:
    sc = scenario(cpu_policy(2, acts_on_cpu=False))
    trace = flexgen_trace(sc, layout(sc))
    per_step = [e for e in trace.steps[1].events if not isinstance(e, Compute)]  # steps[0]: the prologue
    downs = [t for t in per_step if t.op is Op.D2H]
    ups = [t for t in per_step if t.op is Op.H2D and t.source_id >= KV_SOURCE]
    layers = layout(sc).layers_in_cycle
    assert len(downs) == len(ups) == 2 * layers  # one of each per GPU batch per layer
    assert {t.nbytes for t in downs} == {16 * 512 * (4 + 2 * 2)}  # q in fp32, new K and V in fp16
    assert {t.nbytes for t in ups} == {16 * 512 * 4}  # attention output in fp32
    spans = [e for e in trace.steps[1].events if isinstance(e, Compute) and e.label == "cpu"]
    assert len(spans) == 2 * layers


def test_gpu_attention_over_a_host_cache_copies_the_cache_up_and_cc_seals_it() -> None:
    policy = cpu_policy(2, cpu_attention=False, acts_on_cpu=False)
    sc = scenario(policy)
    trace = flexgen_trace(sc, layout(sc))
    kv_up = [t for t in trace.transfers(Op.H2D) if t.source_id >= KV_SOURCE]
    assert kv_up and {t.nbytes for t in kv_up} == {2 * 16 * CONTEXT * 512 * 2}
    # every byte going up is sealed on the host's path under cc, KV cache included
    weights = layout(sc).chunk_lengths
    up_bytes = sum(weights) + 2 * kv_up[0].nbytes
    assert layer_s(sc, Mode.CC) >= up_bytes / HW.seal_bytes_per_s


def test_cc_seals_the_next_layer_before_the_cpu_attention_and_pipellm_hides_it() -> None:
    sc = scenario(cpu_policy(2, acts_on_cpu=False))
    plain, cc, pipellm = (layer_s(sc, m) for m in Mode)
    attention = 2 * cpu_attention_seconds(SMALL, HW, batch=16, context_tokens=CONTEXT)
    seal = sum(layout(sc).chunk_lengths) / HW.seal_bytes_per_s
    assert plain == pytest.approx(attention, rel=0.05)  # the link (0.13 ms) hides behind attention
    assert cc == pytest.approx(attention + seal, rel=0.05)  # one host thread: seal, then attend
    assert pipellm < plain * 1.05  # 8 cores seal the next layer during the attention


def test_scenario_and_workload_reject_a_batch_the_policy_does_not_make() -> None:
    with pytest.raises(ValueError, match="effective batch"):
        Scenario(SMALL, HW, 48, policy=FlexGenPolicy(16, 2))
    with pytest.raises(ValueError, match="multiple"):
        flexgen_policy(Workload(batch=100))
    policy = flexgen_policy(Workload(batch=144))
    assert (policy.gpu_batch_size, policy.num_gpu_batches, policy.cpu_attention) == (48, 3, True)


def test_weight_loading_overlaps_the_cpu_attention_when_hidden_states_live_on_the_cpu() -> None:
    # a 3 GB/s link: the next layer's 6 MiB take 2.1 ms, under one GPU batch's 3.4 ms of attention
    slow = dataclasses.replace(HW, pcie_h2d_bytes_per_s=3 * GB, pcie_d2h_bytes_per_s=3 * GB)
    for batches in (1, 2):
        sc = dataclasses.replace(scenario(cpu_policy(batches)), hardware=slow)
        attention = batches * cpu_attention_seconds(SMALL, slow, batch=16, context_tokens=CONTEXT)
        link = sum(layout(sc).chunk_lengths) / slow.pcie_h2d_bytes_per_s
        plain = layer_s(sc, Mode.PLAIN)
        assert attention <= plain < attention + 0.25 * link  # overlapped, not in series


@pytest.mark.parametrize("mode", [Mode.PLAIN, Mode.CC])
def test_one_streamed_layer_in_the_cycle_times_like_two(mode: Mode) -> None:
    # with one layer in the cycle its next load is its own buffer: the layer must use the load
    # issued before it, not wait for the one it issues
    slow = dataclasses.replace(HW, pcie_h2d_bytes_per_s=3 * GB, pcie_d2h_bytes_per_s=3 * GB)
    sc = dataclasses.replace(scenario(cpu_policy(2)), hardware=slow)
    per_pass = (len(layout(sc).chunk_lengths) + layout(sc).other_chunks) * 14
    one, two = (dataclasses.replace(sc, max_requests=n * per_pass) for n in (1, 2))
    assert (layout(one).layers_in_cycle, layout(two).layers_in_cycle) == (1, 2)
    assert layer_s(one, mode) == pytest.approx(layer_s(two, mode), rel=0.01)


def test_a_decryption_pool_shortens_the_prompt_pass_under_pipellm_only() -> None:
    """The prompt pass sends every GPU batch's K, V and hidden states down; PipeLLM opens them on
    `decrypt_threads` lanes, cc on the host thread, and plain not at all."""
    sc = scenario(cpu_policy(2), prefill=True)
    pool = dataclasses.replace(sc, decrypt_threads=4)
    assert layer_s(pool, Mode.PIPELLM) < 0.5 * layer_s(sc, Mode.PIPELLM)
    for mode in (Mode.PLAIN, Mode.CC):
        assert layer_s(pool, mode) == pytest.approx(layer_s(sc, mode))
    with pytest.raises(ValueError):
        dataclasses.replace(sc, decrypt_threads=0)


def test_host_compute_on_a_device_to_host_copy_waits_for_its_decryption() -> None:
    """CPU attention reads q, K and V in plaintext: under PipeLLM it starts once the decryption lane
    has opened them, as under cc once the host thread has (not when the ciphertext lands)."""
    rec = TraceRecorder()
    rec.begin_step()
    rec.transfer(Op.D2H, 1, 0, 2 * MiB, 0)
    rec.compute(0.0, 0.0, 1e-3, rec.data_transfers, "cpu")
    rec.end_step(1, 0.0)
    hw = dataclasses.replace(HW, message_s=0.0)
    link, open_s = 2 * MiB / hw.pcie_d2h_bytes_per_s, 2 * MiB / hw.open_bytes_per_s
    # cc opens each 1 MiB chunk before it receives the next; PipeLLM's one lane opens the first while
    # the second crosses the link
    for mode, opened in ((Mode.CC, link + open_s), (Mode.PIPELLM, link / 2 + open_s)):
        step = replay(rec.trace, hw, mode, ReplayOptions(decrypt_threads=1)).step_ends[0]
        assert step == pytest.approx(opened + 1e-3), mode
