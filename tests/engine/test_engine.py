"""The engine end to end: every request's greedy output equals running it alone, whatever the memory."""

from __future__ import annotations

import pytest
import torch

from veil.engine.engine import EngineConfig, LLMEngine
from veil.engine.llm import LLM
from veil.engine.request import FinishReason
from veil.engine.runner import kv_block_bytes
from veil.engine.scheduler import PreemptionMode
from veil.engine.weights import ResidentWeights
from veil.model.generate import GenerationRequest, generate
from veil.model.llama import Llama
from veil.model.sampling import SamplingParams
from veil.transport.base import TransportKind

TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "Water boils at",
]
MAX_TOKENS = [6, 5, 7, 4]


def run_engine(model: Llama, prompts, params, config: EngineConfig, eos=None) -> tuple[list, LLMEngine]:
    with LLMEngine(model, config, eos_token_ids=eos) as engine:
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id] += o.new_token_ids
    return [out[i] for i in ids], engine


@pytest.fixture(scope="module")
def prompts(bundled) -> list[list[int]]:
    return [bundled.tokenizer(t).input_ids for t in TEXTS]


@pytest.fixture(scope="module")
def alone(bundled, prompts) -> list[list[int]]:
    """Each prompt through `veil.model.generate` on its own: the reference."""
    eos = bundled.config.eos_token_ids
    return [
        generate(bundled.model, GenerationRequest(max_new_tokens=n, prompt_ids=[p], stop_token_ids=eos))[0]
        for p, n in zip(prompts, MAX_TOKENS, strict=True)
    ]


SWAPPING = {"num_device_blocks": 10, "block_size": 4}  # 40 KV slots for 4 requests of up to 21
CASES = {
    "plain-ample": (TransportKind.PLAIN, {}, PreemptionMode.SWAP),
    "plain-swap": (TransportKind.PLAIN, SWAPPING, PreemptionMode.SWAP),
    "cc-swap": (TransportKind.CC, SWAPPING, PreemptionMode.SWAP),
    "pipellm-swap": (TransportKind.PIPELLM, SWAPPING, PreemptionMode.SWAP),
    "plain-recompute": (TransportKind.PLAIN, SWAPPING, PreemptionMode.RECOMPUTE),
    "cc-auto": (TransportKind.CC, SWAPPING, PreemptionMode.AUTO),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_outputs_equal_running_each_request_alone(bundled, prompts, alone, case: str) -> None:
    kind, geometry, mode = CASES[case]
    config = EngineConfig(transport=kind, preemption_mode=mode, **geometry)
    params = [SamplingParams(max_tokens=n) for n in MAX_TOKENS]
    outputs, engine = run_engine(bundled.model, prompts, params, config)
    assert outputs == alone
    stats = engine.stats
    if geometry:
        assert stats.preemptions >= 2
    assert (stats.bytes_swapped_out > 0) == (stats.preemptions > stats.preempted_by_recompute)
    if mode is PreemptionMode.SWAP:
        assert stats.preempted_by_recompute == 0
    if mode is PreemptionMode.RECOMPUTE:
        assert stats.preempted_by_recompute == stats.preemptions
    assert stats.bytes_swapped_in == stats.bytes_swapped_out
    assert engine.block_manager.device.num_free == engine.block_manager.device.num_blocks


def test_llm_generate_returns_completions_in_prompt_order(bundled, alone) -> None:
    with LLM(bundled.path) as llm:
        done = llm.generate(TEXTS[::-1], [SamplingParams(max_tokens=n) for n in MAX_TOKENS[::-1]])
    assert [c.token_ids for c in done] == alone[::-1]
    assert done[-1].text == bundled.tokenizer.decode(alone[0], skip_special_tokens=True)
    assert all(c.finish_reason is FinishReason.LENGTH for c in done)


# the tiny model: lifecycle, abort, sampling, bad input --------------------------------------------------
def test_abort_mid_run_frees_every_block(tiny: Llama) -> None:
    config = EngineConfig(num_device_blocks=8, block_size=4, num_host_blocks=8)
    with LLMEngine(tiny, config, eos_token_ids=()) as engine:
        ids = [engine.add_request([1 + i] * 6, SamplingParams(max_tokens=20)) for i in range(4)]
        while not engine.scheduler.swapped:
            engine.step()
        engine.abort(engine.scheduler.swapped[0].seq_id)
        engine.abort(engine.scheduler.running[0].seq_id)
        finished = set()
        while engine.has_unfinished():
            finished |= {o.request_id for o in engine.step() if o.finished}
        assert len(finished) == 2 and finished < set(ids)
        assert not engine.abort(ids[0])
        bm = engine.block_manager
        assert (bm.device.num_free, bm.host.num_free) == (8, 8)


def test_a_prompt_that_can_never_fit_is_rejected(tiny: Llama) -> None:
    with LLMEngine(tiny, EngineConfig(num_device_blocks=4, block_size=4)) as engine:
        with pytest.raises(ValueError, match=r"20 KV slots .* the device has 4 blocks \(16 slots\)"):
            engine.add_request([1] * 15, SamplingParams(max_tokens=6))
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 101\)"):
            engine.add_request([1, 101])
        assert not engine.has_unfinished()


def test_a_seeded_request_samples_as_it_would_alone(tiny: Llama) -> None:
    sampled = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=11, max_tokens=8)
    prompt = [5, 6, 7]
    ref = generate(tiny, GenerationRequest(max_new_tokens=8, prompt_ids=[prompt], params=sampled))[0]
    others = [SamplingParams(temperature=1.0, max_tokens=8)] * 2
    outputs, _ = run_engine(
        tiny, [[9, 9], prompt, [3] * 7], [others[0], sampled, others[1]], EngineConfig(), ()
    )
    assert outputs[1] == ref


def test_stop_tokens_end_a_request_and_are_kept(tiny: Llama) -> None:
    (greedy,), _ = run_engine(tiny, [[4, 2]], [SamplingParams(max_tokens=8)], EngineConfig(), ())
    stop = greedy[2]
    params = SamplingParams(max_tokens=8, stop_token_ids=(stop,))
    (cut,), _ = run_engine(tiny, [[4, 2]], [params], EngineConfig(), ())
    assert cut == greedy[: greedy.index(stop) + 1]


def test_the_engine_must_be_started(tiny: Llama) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_device_blocks=4))
    engine.add_request([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="not started"):
        engine.step()
    assert engine.scheduler.waiting and engine.block_manager.device.num_free == 4  # nothing scheduled


def test_device_memory_sets_the_block_count(tiny: Llama) -> None:
    weights, block = ResidentWeights.device_bytes(tiny), kv_block_bytes(tiny.config, 16)
    engine = LLMEngine(tiny, EngineConfig(device_memory_bytes=weights + 5 * block + 7))
    assert engine.block_manager.device.num_blocks == 5
    with pytest.raises(ValueError, match="holds 0 KV blocks"):
        LLMEngine(tiny, EngineConfig(device_memory_bytes=weights))


def test_prompts_given_as_embeddings_generate_what_their_token_ids_do(tiny: Llama) -> None:
    """Split inference: the client sends embeddings; under swapping and recompute alike, each request's
    output equals the same prompt sent as token ids."""
    prompts = [[5, 6, 7, 8, 9], [3] * 9, [11, 12]]
    params = [SamplingParams(max_tokens=10)] * 3
    for mode in (PreemptionMode.SWAP, PreemptionMode.RECOMPUTE):
        config = EngineConfig(num_device_blocks=6, block_size=4, num_host_blocks=8, preemption_mode=mode)
        by_ids, _ = run_engine(tiny, prompts, params, config, ())
        with LLMEngine(tiny, config, eos_token_ids=()) as engine:
            embeds = [tiny.embed_tokens.weight[p].detach() for p in prompts]
            ids = [engine.add_request(None, params[0], prompt_embeds=e) for e in embeds]
            out: dict[int, list[int]] = {i: [] for i in ids}
            while engine.has_unfinished():
                for o in engine.step():
                    out[o.request_id] += o.new_token_ids
            assert engine.stats.preemptions > 0 and not engine._embeds  # forgotten once finished
        assert [out[i] for i in ids] == by_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"prompt_token_ids": [1], "prompt_embeds": torch.zeros(1, 64)}, "exactly one of"),
        ({"prompt_embeds": torch.zeros(2, 63)}, r"shape \(T, 64\)"),
        ({"prompt_embeds": torch.zeros(2, 64, dtype=torch.float64)}, "float32"),
        ({"prompt_embeds": torch.full((2, 64), float("inf"))}, "finite"),
        ({"prompt_embeds": torch.zeros(0, 64)}, "at least one token"),
    ],
)
def test_bad_embedding_prompts_are_refused(tiny: Llama, kwargs, message) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_device_blocks=4))
    with pytest.raises(ValueError, match=message):
        engine.add_request(**kwargs)
    assert not engine.has_unfinished()
