"""Multi-LoRA in the engine: more adapters than slots, mixed adapters in one batch, deferral when
every slot is pinned, loads through plain / cc / pipellm; every request's greedy output equals the
base model with its adapter merged into the weights, run alone."""

from __future__ import annotations

import pytest

from lora.support import merged
from veil.engine.engine import EngineConfig, LLMEngine, LoraConfig
from veil.engine.scheduler import SchedulerOutput
from veil.lora import random_adapter
from veil.model.generate import GenerationRequest, generate
from veil.model.llama import Llama
from veil.model.sampling import SamplingParams
from veil.pipellm.governor import GovernorConfig
from veil.pipellm.keys import SizeClasses
from veil.pipellm.options import PipeLLMOptions
from veil.transport.base import TransportKind

from .support import random_llama, tiny_config

NUM_ADAPTERS, SLOTS, TOKENS = 5, 2, 6
# The tiny model's slots are a MEDIUM transfer that PipeLLM does not speculate by default (real
# adapters are MiBs, BULK): make every chunk BULK, and keep the governor from holding speculation.
ALWAYS_SPECULATE = PipeLLMOptions(
    sizes=SizeClasses(control_below=1, bulk_above=0), governor=GovernorConfig(enabled=False)
)


@pytest.fixture(scope="module")
def model() -> Llama:
    return random_llama(tiny_config(num_layers=3))


@pytest.fixture(scope="module")
def adapters(model: Llama) -> dict[str, object]:
    return {
        f"a{i}": random_adapter(model.config, rank=4 + 2 * (i % 2), alpha=8, seed=i, std=0.2)
        for i in range(NUM_ADAPTERS)
    }


def requests() -> list[tuple[list[int], str | None]]:
    """Mixed adapters, the base model among them, some adapters asked for again after eviction."""
    names = ["a0", "a1", None, "a2", "a0", "a3", "a4", None, "a1", "a4", "a2", "a3"]
    return [([3 + i, 5, 7 + i % 3, 2], name) for i, name in enumerate(names)]


def alone(model: Llama, adapters: dict, prompt: list[int], name: str | None) -> list[int]:
    reference = model if name is None else merged(model, adapters[name])
    return generate(reference, GenerationRequest(max_new_tokens=TOKENS, prompt_ids=[prompt]))[0]


@pytest.mark.parametrize("kind", [TransportKind.PLAIN, TransportKind.CC, TransportKind.PIPELLM])
def test_each_request_equals_its_merged_model_alone(model: Llama, adapters: dict, kind) -> None:
    config = EngineConfig(
        transport=kind,
        num_device_blocks=64,
        max_num_seqs=4,
        lora=LoraConfig(num_slots=SLOTS, max_rank=8),
    )
    plans: list[SchedulerOutput] = []
    with LLMEngine(model, config, eos_token_ids=()) as engine:
        for name, adapter in adapters.items():
            engine.add_adapter(name, adapter)
        schedule = engine.scheduler.schedule

        def recorded() -> SchedulerOutput:
            plans.append(schedule())
            return plans[-1]

        engine.scheduler.schedule = recorded  # type: ignore[method-assign]
        params = SamplingParams(max_tokens=TOKENS)
        ids = [engine.add_request(p, params, adapter=name) for p, name in requests()]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while engine.has_unfinished():
            for step in engine.step():
                out[step.request_id] += step.new_token_ids
        assert engine.slots is not None and not any(engine.slots.pins(n) for n in adapters)
        loads = engine.stats.adapter_loads
    for (prompt, name), request_id in zip(requests(), ids, strict=True):
        assert out[request_id] == alone(model, adapters, prompt, name), (name, kind)
    assert loads > SLOTS  # more adapters than slots: evictions and reloads happened
    assert any(p.deferred for p in plans)  # a request waited for a slot instead of stalling the batch
    mixed = [{c.adapter_slot for c in p.chunks} for p in plans]
    assert any(len(slots) >= 2 for slots in mixed)  # one batch computed with different adapters


def test_adapter_requests_are_refused_clearly(model: Llama, adapters: dict) -> None:
    with LLMEngine(model, EngineConfig(num_device_blocks=8)) as engine:
        with pytest.raises(ValueError, match="unknown adapter"):
            engine.add_request([1, 2], adapter="a0")
        with pytest.raises(ValueError, match="no adapter slots"):
            engine.add_adapter("a0", adapters["a0"])
    config = EngineConfig(num_device_blocks=8, lora=LoraConfig(num_slots=1, max_rank=4))
    with LLMEngine(model, config) as engine:
        with pytest.raises(ValueError, match="rank"):
            engine.add_adapter("a1", adapters["a1"])  # rank 6 > the slots' 4
        engine.add_adapter("a0", adapters["a0"])
        with pytest.raises(ValueError, match="already"):
            engine.add_adapter("a0", adapters["a0"])


def test_the_arena_holds_the_slots(model: Llama) -> None:
    plain = EngineConfig(num_device_blocks=8)
    with_slots = EngineConfig(num_device_blocks=8, lora=LoraConfig(num_slots=3, max_rank=8))
    grown = with_slots.geometry(model)[0] - plain.geometry(model)[0]
    with LLMEngine(model, with_slots) as engine:
        bank = engine.runner.adapters
        assert bank is not None and grown == 3 * bank.slot_bytes
        assert engine.runner.transport.device.allocated_bytes == with_slots.geometry(model)[0]


def test_pipellm_seals_queued_adapters_ahead_from_hints(model: Llama, adapters: dict) -> None:
    """The engine names the adapters its queue needs; the transport commits pre-sealed loads."""
    hits = {}
    for hint in (False, True):
        config = EngineConfig(
            transport=TransportKind.PIPELLM,
            num_device_blocks=64,
            max_num_seqs=2,
            lora=LoraConfig(num_slots=SLOTS, max_rank=8, hint_transport=hint),
            pipellm=ALWAYS_SPECULATE,  # the test is about what hints let the speculator do
        )
        with LLMEngine(model, config, eos_token_ids=()) as engine:
            for name, adapter in adapters.items():
                engine.add_adapter(name, adapter)
            for prompt, name in requests():
                engine.add_request(prompt, SamplingParams(max_tokens=TOKENS), adapter=name)
            while engine.has_unfinished():
                engine.step()
            hits[hint] = engine.runner.transport.stats().pipellm.speculator.hits
    assert hits[True] > hits[False]
