"""Traces recorded from the real engine: what they hold, their file format, and that the simulator
replaying one makes the runtime's speculator decisions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.support import random_llama, tiny_config
from veil.engine.engine import EngineConfig, EngineStats, LLMEngine
from veil.engine.offload_policy import OffloadPolicy
from veil.model.llama import Llama
from veil.model.sampling import SamplingParams
from veil.pipellm import Decision, SpeculatorStats
from veil.pipellm.governor import GovernorConfig
from veil.pipellm.options import PipeLLMOptions
from veil.sim import HardwareProfile
from veil.sim.replay import Mode, ReplayOptions, replay
from veil.trace import Compute, Op, Trace, TraceRecorder, Transfer
from veil.transport.base import TransportKind

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.fixture(scope="module")
def model() -> Llama:
    """A random Llama big enough that a layer (2.6 MB fp32) and a KV block (6 layers x 16 tokens:
    192 KiB) are bulk transfers, which PipeLLM speculates on; small enough to run in a second."""
    config = tiny_config(
        hidden_size=256, intermediate_size=512, num_layers=6, num_heads=8, num_kv_heads=8, head_dim=32
    )
    return random_llama(config)


@dataclass
class Recorded:
    trace: Trace
    engine: EngineStats
    block_bytes: int
    h2d: int  # transport calls, from the transport's own counters
    d2h: int
    speculator: SpeculatorStats | None


def _record(model: Llama, config: EngineConfig, requests: int, tokens: int) -> Recorded:
    recorder = TraceRecorder(workload="test")
    with LLMEngine(model, config, recorder=recorder) as engine:
        params = SamplingParams(max_tokens=tokens, stop_token_ids=())
        for i in range(requests):
            engine.add_request([*PROMPT, i], params)
        while engine.has_unfinished():
            engine.step()
        stats = engine.runner.transport.stats()
        block_bytes = engine.runner.block_bytes
    speculator = stats.pipellm.speculator if stats.pipellm is not None else None
    return Recorded(
        recorder.trace, engine.stats, block_bytes, stats.h2d_transfers, stats.d2h_transfers, speculator
    )


@pytest.fixture(scope="module")
def swap_trace(model: Llama) -> Recorded:
    # 6 blocks of 16 tokens for 4 requests of 9 + 24 tokens: the scheduler must swap.
    config = EngineConfig(transport=TransportKind.PLAIN, num_device_blocks=6, num_host_blocks=16)
    return _record(model, config, requests=4, tokens=24)


def test_a_recorded_trace_holds_every_step_transfer_and_layer(swap_trace: Recorded, model: Llama) -> None:
    r = swap_trace
    assert len(r.trace.steps) == r.engine.steps + 1  # start-up (the weight upload) first
    startup, *steps = r.trace.steps
    assert startup.tokens == 0 and all(isinstance(e, Transfer) for e in startup.events)
    # the phase the engine named before each step's transfers (none for the start-up upload)
    assert startup.phase == "" and steps[0].phase == "prefill" and steps[-1].phase == "decode"
    assert {s.phase for s in steps} == {"prefill", "decode"}
    trace = Trace(steps, r.trace.meta)
    assert trace.tokens == r.engine.generated_tokens
    assert len(r.trace.transfers(Op.H2D)) == r.h2d
    assert len(trace.transfers(Op.H2D)) == r.engine.blocks_swapped_in > 0
    assert len(trace.transfers(Op.D2H)) == r.d2h == r.engine.blocks_swapped_out > 0
    assert all(t.nbytes == r.block_bytes for t in trace.transfers(Op.H2D, Op.D2H))
    layers = model.config.num_layers
    for step in trace.steps:
        spans = [e for e in step.events if isinstance(e, Compute)]
        assert [s.label for s in spans[:-1]] == ["layer"] * (len(spans) - 1) and spans[-1].label == "host"
        assert all(s.flops > 0 and s.nbytes > 0 and s.tokens > 0 and s.adapters == 0 for s in spans[:-1])
        assert step.seconds >= sum(s.seconds for s in spans) * 0.99
    # one span per pass per layer: every layer runs the step's passes, in the same order
    passes = [[(s.flops, s.tokens) for s in step.events if isinstance(s, Compute) and s.label == "layer"]
              for step in trace.steps]  # fmt: skip
    assert all(len(p) % layers == 0 and p == p[: len(p) // layers] * layers for p in passes)
    # a swap-in comes back from a host block a swap-out went to
    assert {t.source_id for t in trace.transfers(Op.H2D)} <= {t.source_id for t in trace.transfers(Op.D2H)}


def test_a_prefill_beside_decodes_is_a_pass_of_its_own_in_every_layer(model: Llama) -> None:
    recorder = TraceRecorder()
    config = EngineConfig(transport=TransportKind.PLAIN, num_device_blocks=8)
    with LLMEngine(model, config, recorder=recorder) as engine:
        params = SamplingParams(max_tokens=3, stop_token_ids=())
        engine.add_request(PROMPT, params)
        engine.step()  # the first prompt's prefill
        engine.add_request([*PROMPT, 9, 10], params)
        engine.step()  # the second's prefill beside the first's decode: two passes
    spans = [e for e in recorder.trace.steps[-1].events if isinstance(e, Compute) and e.label == "layer"]
    assert [s.tokens for s in spans] == [10, 1] * model.config.num_layers
    prefill, decode = spans[:2]
    assert prefill.flops > 9 * decode.flops and prefill.seconds > 0 and decode.seconds > 0


def test_a_layer_waits_for_every_transfer_issued_before_the_step(swap_trace: Recorded) -> None:
    startup, *steps = swap_trace.trace.steps
    issued = len(startup.events)
    for step in steps:
        for event in step.events:
            if isinstance(event, Transfer) and event.op is not Op.HINT:
                issued += 1
            elif isinstance(event, Compute) and event.label == "layer":
                assert event.needs == issued  # resident weights: the swaps are all it waits for


def test_file_round_trip(swap_trace: Recorded, tmp_path: Path) -> None:
    trace = swap_trace.trace
    trace.save(tmp_path / "t.json")
    assert Trace.load(tmp_path / "t.json") == trace
    with pytest.raises(ValueError, match="not a veil-trace"):
        Trace.from_json({"format": "other", "steps": []})


def test_no_recorder_records_nothing(model: Llama) -> None:
    config = EngineConfig(transport=TransportKind.PLAIN, num_device_blocks=8)
    with LLMEngine(model, config) as engine:
        assert engine.runner.transport.recorder is None
        engine.add_request(PROMPT, SamplingParams(max_tokens=2))
        engine.step()


# Sealing is instant and cores are plenty: every prediction is sealed before it is asked for, which
# is what the runtime's workers achieve when compute dominates (weight streaming here).
INSTANT = HardwareProfile("instant", aes_gcm_bytes_per_s=1e15, spare_cores=64)


WORKLOADS = {
    "offload": (EngineConfig(num_device_blocks=8, offload=OffloadPolicy(batch_size=2)), 2, 5),
    "kvswap": (EngineConfig(num_device_blocks=4, num_host_blocks=16), 3, 16),
}


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_runtime_and_simulator_make_the_same_speculator_decisions(model: Llama, workload: str) -> None:
    config, requests, tokens = WORKLOADS[workload]
    options = PipeLLMOptions(workers=1, governor=GovernorConfig(enabled=False))
    config = dataclasses.replace(config, transport=TransportKind.PIPELLM, pipellm=options)
    recorded = _record(model, config, requests, tokens)
    decisions: list[Decision] = []
    same = ReplayOptions(governor=options.governor)  # the runtime's governor configuration
    sim = replay(recorded.trace, INSTANT, Mode.PIPELLM, same, on_decision=decisions.append)
    assert sim.stats is not None and recorded.speculator is not None
    fields = ("requests", "hits", "padded_hits", "misses", "relinquishes", "nops", "stale", "sync_seals")
    assert {f: getattr(sim.stats, f) for f in fields} == {f: getattr(recorded.speculator, f) for f in fields}
    assert sim.stats.requests > 0 and (workload != "offload" or sim.stats.hits > sim.stats.misses)
    assert len(decisions) == sim.stats.requests


def test_the_replay_enters_each_phase_the_engine_named(model: Llama) -> None:
    # The runtime keeps one governor per phase (`Transport.enter_phase`); so does the replay, from the
    # phases the trace recorded: the start-up upload is unlabelled, then prefill and decode steps
    # (every layer's weights streamed in each of them).
    offload, requests, tokens = WORKLOADS["offload"]
    trace = _record(
        model, dataclasses.replace(offload, transport=TransportKind.PLAIN), requests, tokens
    ).trace
    # every report closes a window, and none is left out as idle time
    options = ReplayOptions(governor=GovernorConfig(window_bytes=1, idle_factor=1e12))
    sim = replay(trace, INSTANT, Mode.PIPELLM, options)
    assert list(sim.governor_by_phase) == ["unlabelled", "prefill", "decode"]
    assert sim.governor is not None
    assert all(g.windows > 0 for g in sim.governor_by_phase.values())
    assert sim.governor.windows == sum(g.windows for g in sim.governor_by_phase.values())
    unphased = Trace([dataclasses.replace(s, phase="") for s in trace.steps], trace.meta)
    assert list(replay(unphased, INSTANT, Mode.PIPELLM, options).governor_by_phase) == ["unlabelled"]
