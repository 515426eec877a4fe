"""Offloaded generation: same tokens as a resident run over every transport, within device capacity."""

from __future__ import annotations

import pytest
import torch

from veil.cc import Device, DeviceOutOfMemory
from veil.engine.offload import OffloadedModel
from veil.engine.offload_policy import HostDtype, OffloadPolicy
from veil.errors import UsageError
from veil.model.generate import GenerationRequest, generate
from veil.model.llama import LayerWeights
from veil.pipellm.governor import GovernorConfig
from veil.pipellm.options import PipeLLMOptions
from veil.transport import TransportKind, make_transport

PROMPTS = ["The capital of France is", "Encryption keeps secrets"]
NEW_TOKENS = 6


def model_bytes(config) -> int:
    layer = LayerWeights.numel(config) * 4
    return config.num_layers * layer + config.vocab_size * config.hidden_size * 4


def run_offloaded(
    bundled, kind: TransportKind, policy: OffloadPolicy, capacity: int
) -> tuple[list, OffloadedModel]:
    ids = [bundled.tokenizer(p).input_ids for p in PROMPTS]
    with Device(capacity_bytes=capacity) as device, make_transport(kind, device) as transport:
        with OffloadedModel(bundled.model, transport, policy) as runner:
            out = generate(runner, GenerationRequest(max_new_tokens=NEW_TOKENS, prompt_ids=ids))
        assert device.allocated_bytes == 0  # everything freed on close
    return out, runner


@pytest.fixture(scope="module")
def resident(bundled):
    ids = [bundled.tokenizer(p).input_ids for p in PROMPTS]
    return generate(bundled.model, GenerationRequest(max_new_tokens=NEW_TOKENS, prompt_ids=ids))


@pytest.mark.parametrize("kind", [TransportKind.PLAIN, TransportKind.CC])
def test_outputs_identical_to_resident_with_capacity_below_model_size(bundled, resident, kind) -> None:
    capacity = model_bytes(bundled.config) // 2
    out, runner = run_offloaded(bundled, kind, OffloadPolicy(resident_fraction=0.1), capacity)
    assert out == resident
    streamed_layers = bundled.config.num_layers - 3
    assert runner.stats.layers_streamed >= streamed_layers * NEW_TOKENS


def test_bf16_host_storage_matches_bf16_rounded_resident(bundled) -> None:
    """bf16 halves the bytes to seal; the result equals a resident model with bf16-rounded layers."""
    out, runner = run_offloaded(
        bundled, TransportKind.CC, OffloadPolicy(host_dtype=HostDtype.BF16), model_bytes(bundled.config)
    )
    rounded = {k: v.clone() for k, v in bundled.model.state_dict().items()}
    model = type(bundled.model)(bundled.config)
    model.load_state_dict(rounded)
    for layer in model.layers:
        for t in layer.weights().tensors():
            t.copy_(t.to(torch.bfloat16).to(torch.float32))
    ids = [bundled.tokenizer(p).input_ids for p in PROMPTS]
    assert out == generate(model.eval(), GenerationRequest(max_new_tokens=NEW_TOKENS, prompt_ids=ids))
    layer_bytes = LayerWeights.numel(bundled.config) * 2
    assert runner.stats.bytes_streamed == runner.stats.layers_streamed * layer_bytes


def test_capacity_too_small_is_a_clear_error_and_frees_everything(bundled) -> None:
    ids = [bundled.tokenizer(PROMPTS[0]).input_ids]
    too_small = (
        bundled.config.vocab_size * bundled.config.hidden_size * 4 + LayerWeights.numel(bundled.config) * 4
    )
    with Device(capacity_bytes=too_small) as device, make_transport(TransportKind.PLAIN, device) as transport:
        with (
            pytest.raises(DeviceOutOfMemory),
            OffloadedModel(bundled.model, transport, OffloadPolicy()) as runner,
        ):
            generate(runner, GenerationRequest(max_new_tokens=2, prompt_ids=ids))
        assert device.allocated_bytes == 0


@pytest.mark.parametrize("kwargs", [{"resident_fraction": 1.5}, {"batch_size": 0}, {"prefetch_layers": 0}])
def test_policy_validation(kwargs) -> None:
    with pytest.raises(UsageError):
        OffloadPolicy(**kwargs)


def test_resident_layers_rounding() -> None:
    assert OffloadPolicy(resident_fraction=0.0).resident_layers(30) == 0
    assert OffloadPolicy(resident_fraction=0.5).resident_layers(30) == 15
    assert OffloadPolicy(resident_fraction=1.0).resident_layers(30) == 30


@pytest.mark.parametrize(
    "policy", [OffloadPolicy(), OffloadPolicy(resident_fraction=0.5, host_dtype=HostDtype.BF16)]
)
def test_device_bytes_needed_is_enough_and_tight(bundled, policy) -> None:
    """The planner's figure runs; a little less memory than it says does not."""
    ids = [bundled.tokenizer(p).input_ids for p in PROMPTS]
    max_tokens = max(len(i) for i in ids) + 2
    need = OffloadedModel.device_bytes_needed(bundled.config, policy, len(ids), max_tokens)
    request = GenerationRequest(max_new_tokens=2, prompt_ids=ids)
    for capacity, fits in ((need, True), (need - 4096, False)):
        with (
            Device(capacity_bytes=capacity) as device,
            make_transport(TransportKind.PLAIN, device) as transport,
        ):
            try:
                with OffloadedModel(bundled.model, transport, policy) as runner:
                    generate(runner, request)
                ran = True
            except DeviceOutOfMemory:
                ran = False
        assert ran == fits


ALWAYS_SPECULATE = PipeLLMOptions(governor=GovernorConfig(enabled=False))  # the test is about learning


def test_pipellm_learns_the_layer_cycle_with_and_without_hints(bundled, resident) -> None:
    """Transparent: no hints needed; with hints the transport is told and commits from the start."""
    capacity = model_bytes(bundled.config)
    results = {}
    for hints in (False, True):
        policy = OffloadPolicy(resident_fraction=0.5, hint_transport=hints)
        with (
            Device(capacity_bytes=capacity) as device,
            make_transport(TransportKind.PIPELLM, device, pipellm=ALWAYS_SPECULATE) as transport,
        ):
            ids = [bundled.tokenizer(p).input_ids for p in PROMPTS]
            with OffloadedModel(bundled.model, transport, policy) as runner:
                out = generate(runner, GenerationRequest(max_new_tokens=NEW_TOKENS, prompt_ids=ids))
            results[hints] = (out, transport.stats().pipellm.speculator)
    for out, stats in results.values():
        assert out == resident
        assert stats.hits > stats.misses, stats  # the speculator committed pre-sealed chunks
    assert results[True][1].misses < results[False][1].misses  # hints skip the learning phase


def test_many_prompts_in_batches_match_one_by_one(bundled) -> None:
    """Batched offloaded generation returns, in prompt order, what each prompt gives alone."""
    from veil.engine.batch import generate_many

    texts = ["Hello", "The capital of France is", "Secure channels", "One two three four five", "A"]
    prompts = [bundled.tokenizer(t).input_ids for t in texts]
    alone = [generate(bundled.model, GenerationRequest(max_new_tokens=4, prompt_ids=[p]))[0] for p in prompts]
    done: list[tuple[int, int]] = []
    policy = OffloadPolicy(resident_fraction=0.5, batch_size=2)
    with (
        Device(capacity_bytes=model_bytes(bundled.config)) as device,
        make_transport(TransportKind.CC, device) as tr,
    ):
        with OffloadedModel(bundled.model, tr, policy) as runner:
            out = generate_many(
                runner, prompts, batch_size=policy.batch_size, max_new_tokens=4,
                progress=lambda d, n: done.append((d, n)),
            )  # fmt: skip
    assert out == alone
    assert done == [(2, 5), (4, 5), (5, 5)]
