"""The engine on its own thread: submissions from many threads, abort, calls between steps, and what
happens when a step fails or the loop closes with requests in flight."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from veil.engine.engine import EngineConfig, LLMEngine, RequestOutput
from veil.engine.loop import EngineLoop, EngineStopped
from veil.model.llama import Llama
from veil.model.sampling import SamplingParams


class Collect:
    """A sink that records what the loop delivers and signals the end."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def put(self, output: RequestOutput, compute_s: float) -> None:
        assert compute_s >= 0
        self.tokens += output.new_token_ids
        if output.finished:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


def alone(model: Llama, prompt: list[int], max_tokens: int) -> list[int]:
    with LLMEngine(model, EngineConfig(num_device_blocks=8), eos_token_ids=()) as engine:
        engine.add_request(prompt, SamplingParams(max_tokens=max_tokens))
        out: list[int] = []
        while engine.has_unfinished():
            out += [t for o in engine.step() for t in o.new_token_ids]
    return out


def test_requests_from_many_threads_each_get_their_own_tokens(tiny: Llama) -> None:
    prompts = [[1 + i, 2 + i, 3 + i] for i in range(12)]
    config = EngineConfig(num_device_blocks=6, block_size=4, num_host_blocks=16)  # forces swaps
    with EngineLoop(LLMEngine(tiny, config, eos_token_ids=())) as loop:

        def one(prompt: list[int]) -> list[int]:
            sink = Collect()
            loop.submit(sink, prompt, SamplingParams(max_tokens=9))
            assert sink.done.wait(60) and sink.error is None
            return sink.tokens

        with ThreadPoolExecutor(6) as pool:
            outputs = list(pool.map(one, prompts))
        assert loop.stats.steps < sum(map(len, outputs))  # batched
        assert loop.engine.stats.preemptions > 0
        free = loop.call(lambda: loop.engine.block_manager.device.num_free)
    assert outputs == [alone(tiny, p, 9) for p in prompts]
    assert free == 6


def test_a_refused_request_raises_in_the_caller_and_the_loop_carries_on(tiny: Llama) -> None:
    with EngineLoop(LLMEngine(tiny, EngineConfig(num_device_blocks=2, block_size=4))) as loop:
        with pytest.raises(ValueError, match="blocks"):
            loop.submit(Collect(), [1] * 20, SamplingParams(max_tokens=4))
        sink = Collect()
        loop.submit(sink, [1, 2], SamplingParams(max_tokens=3))
        assert sink.done.wait(30) and len(sink.tokens) <= 3 and sink.error is None


def test_abort_stops_delivery_and_frees_blocks(tiny: Llama) -> None:
    with EngineLoop(LLMEngine(tiny, EngineConfig(num_device_blocks=64), eos_token_ids=())) as loop:
        sink = Collect()
        request_id = loop.submit(sink, [4, 5, 6], SamplingParams(max_tokens=1000))
        while not sink.tokens:
            threading.Event().wait(0.005)
        loop.abort(request_id)
        loop.abort(request_id)  # twice: a no-op
        assert loop.call(lambda: loop.engine.block_manager.device.num_free) == 64
        delivered = len(sink.tokens)
        assert loop.call(lambda: len(sink.tokens)) == delivered and not sink.done.is_set()
        assert loop.stats.aborted == 1 and loop.stats.in_flight == 0


def test_closing_with_requests_in_flight_fails_them_and_refuses_new_work(tiny: Llama) -> None:
    loop = EngineLoop(LLMEngine(tiny, EngineConfig(num_device_blocks=256), eos_token_ids=()))
    with loop:
        sinks = [Collect() for _ in range(3)]
        for sink in sinks:
            loop.submit(sink, [7, 8], SamplingParams(max_tokens=1000))
    assert all(s.done.is_set() and isinstance(s.error, EngineStopped) for s in sinks)
    with pytest.raises(EngineStopped):
        loop.submit(Collect(), [1], SamplingParams(max_tokens=1))
    with pytest.raises(EngineStopped):
        loop.call(lambda: 1)


def test_a_failed_step_stops_the_loop_for_good(tiny: Llama) -> None:
    engine = LLMEngine(tiny, EngineConfig(num_device_blocks=8), eos_token_ids=())
    with EngineLoop(engine) as loop:
        sink = Collect()
        loop.call(lambda: setattr(engine.runner, "execute", _explode))  # the next step raises
        loop.submit(sink, [1, 2], SamplingParams(max_tokens=5))
        assert sink.done.wait(30)
        assert isinstance(sink.error, EngineStopped) and "integrity" in str(sink.error)
        assert not loop.running and loop.stats.errors
        with pytest.raises(EngineStopped, match="failed step"):
            loop.submit(Collect(), [1], SamplingParams(max_tokens=1))


def _explode(*args: object, **kwargs: object) -> None:
    raise RuntimeError("integrity check failed on a swapped block")


def test_the_loop_cannot_start_twice(tiny: Llama) -> None:
    with EngineLoop(LLMEngine(tiny, EngineConfig(num_device_blocks=2))) as loop, pytest.raises(RuntimeError):
        loop.__enter__()
