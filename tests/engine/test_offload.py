"""Weight offloading in the engine: streamed layers give the resident model's tokens over every
transport, within a device arena smaller than the model, and the planner's arena figure is tight."""

from __future__ import annotations

import pytest
import torch

from veil.cc import Device, DeviceOutOfMemory
from veil.engine.engine import EngineConfig, LLMEngine
from veil.engine.offload_policy import HostDtype, OffloadPolicy
from veil.engine.runner import step_phase
from veil.engine.scheduler import ScheduledChunk, SchedulerOutput
from veil.engine.weights import StreamedWeights
from veil.errors import UsageError
from veil.model.generate import GenerationRequest, generate
from veil.model.llama import LayerWeights, Llama
from veil.model.sampling import SamplingParams
from veil.pipellm.governor import GovernorConfig
from veil.pipellm.options import PipeLLMOptions
from veil.transport import Phase, TransportKind, make_transport

PROMPTS = ["The capital of France is", "Encryption keeps secrets"]
NEW_TOKENS = 6
ALWAYS_SPECULATE = PipeLLMOptions(governor=GovernorConfig(enabled=False))  # the test is about learning


def model_bytes(config) -> int:
    layer = LayerWeights.numel(config) * 4
    return config.num_layers * layer + config.vocab_size * config.hidden_size * 4


def reference(model: Llama, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt alone through the resident model's own generation loop."""
    request = GenerationRequest
    return [generate(model, request(max_new_tokens=NEW_TOKENS, prompt_ids=[p]))[0] for p in prompts]


def run_engine(model: Llama, prompts: list[list[int]], config: EngineConfig) -> tuple[list[list[int]], dict]:
    """Greedy outputs of every prompt batched in one engine, and its streaming and transport stats."""
    params = SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=())
    with LLMEngine(model, config) as engine:
        ids = [engine.add_request(p, params) for p in prompts]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while engine.has_unfinished():
            for step in engine.step():
                out[step.request_id] += step.new_token_ids
        stats = {"stream": engine.runner.weights.stats, "transport": engine.runner.transport.stats()}
        assert engine.runner.transport.device.allocated_bytes > 0
    return [out[i] for i in ids], stats


@pytest.fixture(scope="module")
def prompts(bundled) -> list[list[int]]:
    return [bundled.tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def resident(bundled, prompts):
    return reference(bundled.model, prompts)


@pytest.mark.parametrize("kind", [TransportKind.PLAIN, TransportKind.CC])
def test_outputs_identical_to_resident_with_an_arena_below_model_size(
    bundled, prompts, resident, kind
) -> None:
    config = EngineConfig(transport=kind, num_device_blocks=8, offload=OffloadPolicy(resident_fraction=0.1))
    assert config.geometry(bundled.model)[0] < model_bytes(bundled.config) // 2
    out, stats = run_engine(bundled.model, prompts, config)
    assert out == resident
    streamed_layers = bundled.config.num_layers - 3
    assert stats["stream"].layers_streamed >= streamed_layers * NEW_TOKENS  # once per step, not per batch


def test_bf16_host_storage_matches_bf16_rounded_resident(bundled, prompts) -> None:
    """bf16 halves the bytes to seal; the result equals a resident model with bf16-rounded layers."""
    config = EngineConfig(
        transport=TransportKind.CC, num_device_blocks=8, offload=OffloadPolicy(host_dtype=HostDtype.BF16)
    )
    out, stats = run_engine(bundled.model, prompts, config)
    model = type(bundled.model)(bundled.config)
    model.load_state_dict({k: v.clone() for k, v in bundled.model.state_dict().items()})
    for layer in model.layers:
        for t in layer.weights().tensors():
            t.copy_(t.to(torch.bfloat16).to(torch.float32))
    assert out == reference(model.eval(), prompts)
    layer_bytes = LayerWeights.numel(bundled.config) * 2
    assert stats["stream"].bytes_streamed == stats["stream"].layers_streamed * layer_bytes


@pytest.mark.parametrize(
    "policy", [OffloadPolicy(), OffloadPolicy(resident_fraction=0.5, host_dtype=HostDtype.BF16)]
)
def test_streamed_weights_device_bytes_is_enough_and_tight(tiny, policy) -> None:
    """Two full cycles of layer loads fit in the planner's figure; 4 KiB less does not."""
    need = StreamedWeights.device_bytes(tiny.config, policy)
    for capacity, fits in ((need, True), (need - 4096, False)):
        with Device(capacity_bytes=capacity) as device, make_transport(TransportKind.PLAIN, device) as tr:
            try:
                with StreamedWeights(tiny, tr, policy) as weights:
                    for _ in range(2):
                        for layer in range(tiny.config.num_layers):
                            want = tiny.layers[layer].weights().wqkv
                            if layer >= policy.resident_layers(tiny.config.num_layers):
                                want = want.to(policy.host_dtype.torch).float()  # streamed: host dtype
                            assert torch.equal(weights.layer(layer).wqkv, want)
                            weights.release(layer)
                ran = True
            except DeviceOutOfMemory:
                ran = False
            assert device.allocated_bytes == 0  # everything freed on close, even after a failure
        assert ran == fits


def test_an_arena_too_small_for_the_weights_is_a_clear_error(bundled) -> None:
    config = EngineConfig(device_memory_bytes=100 << 20, offload=OffloadPolicy(resident_fraction=0.9))
    with pytest.raises(ValueError, match="holds 0 KV blocks"):
        LLMEngine(bundled.model, config)


@pytest.mark.parametrize("kwargs", [{"resident_fraction": 1.5}, {"batch_size": 0}, {"prefetch_layers": 0}])
def test_policy_validation(kwargs) -> None:
    with pytest.raises(UsageError):
        OffloadPolicy(**kwargs)


def test_resident_layers_rounding() -> None:
    assert OffloadPolicy(resident_fraction=0.0).resident_layers(30) == 0
    assert OffloadPolicy(resident_fraction=0.5).resident_layers(30) == 15
    assert OffloadPolicy(resident_fraction=1.0).resident_layers(30) == 30


def test_pipellm_learns_the_layer_cycle_with_and_without_hints(bundled, prompts, resident) -> None:
    """Transparent: no hints needed; with hints the transport is told and commits from the start."""
    results = {}
    for hints in (False, True):
        config = EngineConfig(
            transport=TransportKind.PIPELLM,
            num_device_blocks=8,
            offload=OffloadPolicy(resident_fraction=0.5, hint_transport=hints),
            pipellm=ALWAYS_SPECULATE,
        )
        out, stats = run_engine(bundled.model, prompts, config)
        results[hints] = (out, stats["transport"].pipellm.speculator)
    for out, stats in results.values():
        assert out == resident
        assert stats.hits > stats.misses, stats  # the speculator committed pre-sealed chunks
    assert results[True][1].misses < results[False][1].misses  # hints skip the learning phase


def test_pipellm_measures_prefill_and_decode_steps_with_their_own_governors(tiny) -> None:
    """A real engine streaming every layer through a real pipellm transport: the runner names each
    step's phase before its transfers, and the governor's windows fall under "prefill" (the first
    step) and "decode" (the rest); the start-up uploads come before any phase."""
    layer_bytes = LayerWeights.numel(tiny.config) * 4
    governor = GovernorConfig(window_bytes=layer_bytes, idle_factor=1e12)  # no report is idle
    config = EngineConfig(
        transport=TransportKind.PIPELLM,
        num_device_blocks=8,
        offload=OffloadPolicy(),  # both layers streamed, one load ahead
        pipellm=PipeLLMOptions(governor=governor),
    )
    _, stats = run_engine(tiny, [[1, 2, 3, 4, 5]], config)
    pipellm = stats["transport"].pipellm
    by_phase = pipellm.governor_by_phase
    assert list(by_phase) == ["unlabelled", "prefill", "decode"]
    # prefill: 3 loads (its 2 layers and the next step's first), each one a report and a window
    assert by_phase["prefill"].windows == 3
    # decode: 5 steps of 2 loads, the last one not reported yet
    assert by_phase["decode"].windows == 2 * (NEW_TOKENS - 1) - 1
    assert pipellm.governor.windows == sum(g.windows for g in by_phase.values())


@pytest.mark.parametrize(
    ("lengths", "phase"),
    [((1, 1), Phase.DECODE), ((1, 4), Phase.PREFILL), ((3,), Phase.PREFILL), ((), Phase.DECODE)],
)
def test_a_step_with_any_prefill_chunk_is_a_prefill_step(lengths: tuple[int, ...], phase: Phase) -> None:
    chunks = [ScheduledChunk(i, tuple(range(n)), 0, (i,), True) for i, n in enumerate(lengths)]
    assert step_phase(SchedulerOutput(chunks=chunks)) is phase
