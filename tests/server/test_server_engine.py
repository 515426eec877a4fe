"""The server on the engine: concurrent requests batched over a small, swapping KV cache under `cc`;
prompts that never fit refused; a client that goes away frees its blocks; a split-inference request
shares the batch with plain ones."""

from __future__ import annotations

import json
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import torch

from veil import wire
from veil.attest.verifier import Policy, Verifier
from veil.engine.engine import EngineConfig
from veil.model.generate import GenerationRequest, generate
from veil.model.loader import LoadedModel
from veil.server.app import create_app
from veil.server.runner import ServerThread
from veil.server.service import InferenceService, Limits
from veil.transport.base import TransportKind

BLOCKS = 6  # 96 token slots: two or three requests at once, the rest wait or swap


@dataclass
class Small:
    url: str
    service: InferenceService

    def free_blocks(self) -> int:
        return self.service.loop.call(lambda: self.service.engine.block_manager.device.num_free)


@pytest.fixture(scope="module")
def small(loaded: LoadedModel) -> Iterator[Small]:
    hidden = loaded.config.hidden_size
    limits = Limits(max_prompt_tokens=128, max_new_tokens=64, max_body_bytes=256 * hidden * 4)
    engine = EngineConfig(transport=TransportKind.CC, num_device_blocks=BLOCKS, num_host_blocks=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with InferenceService(loaded, "small", limits, engine) as service:
            app = create_app(service, Verifier(Policy(frozenset(), frozenset())))
            with ServerThread(app) as server:
                yield Small(server.url, service)


def _alone(loaded: LoadedModel, ids: list[int], max_tokens: int) -> list[int]:
    stops = loaded.stop_token_ids
    request = GenerationRequest(max_tokens, prompt_ids=[ids], stop_token_ids=stops)
    out = generate(loaded.model, request)[0]
    return out[: next((i + 1 for i, t in enumerate(out) if t in stops), len(out))]


def _complete(url: str, prompt: list[int], max_tokens: int) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


def test_concurrent_requests_are_batched_and_each_equals_running_alone(small: Small, loaded) -> None:
    texts = [
        "The capital of France is",
        "Confidential computing protects data in use by",
        "一二三四五六七八九十",  # several tokens per character: non-Latin text through the same path
        "Once upon a time, in a small village, there lived",
        "def fibonacci(n):",
        "Encryption keeps secrets",
    ]
    prompts = [loaded.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    steps_before = small.service.engine.stats.steps
    preempted_before = small.service.engine.stats.preemptions
    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(lambda p: _complete(small.url, p, 24), prompts))
    for prompt, response in zip(prompts, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["veil"]["token_ids"] == _alone(loaded, prompt, 24)
        assert body["choices"][0]["text"] == loaded.tokenizer.decode(
            body["veil"]["token_ids"], skip_special_tokens=True
        )
    stats = small.service.engine.stats
    generated = sum(len(r.json()["veil"]["token_ids"]) for r in responses)
    assert stats.steps - steps_before < generated  # several requests shared steps
    assert stats.preemptions > preempted_before  # 6 blocks were too few: swaps happened, nothing lost
    assert small.free_blocks() == BLOCKS


def test_a_prompt_that_can_never_fit_gets_400_not_a_hang(small: Small) -> None:
    response = _complete(small.url, list(range(100, 200)), 8)  # 100 + 8 tokens > 96 slots
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "never" in message or "blocks" in message
    assert _complete(small.url, [100, 101], 2).status_code == 200  # and the server carries on


def _wait_for_free(small: Small, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while small.free_blocks() != BLOCKS and time.monotonic() < deadline:
        time.sleep(0.05)
    return small.free_blocks()


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(small: Small, loaded) -> None:
    embeds = loaded.model.embed_tokens.weight[[100, 200, 300, 400]].detach()[None]
    aborted = small.service.loop.stats.aborted
    body = wire.encode({"embeddings": embeds})
    with (
        httpx.Client(base_url=small.url, timeout=60) as http,
        http.stream("POST", "/v1/cmif/generate?max_tokens=64", content=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        assert "token_id" in json.loads(next(lines))
        assert small.free_blocks() < BLOCKS  # the request holds blocks while it streams
    assert _wait_for_free(small) == BLOCKS
    assert small.service.loop.stats.aborted == aborted + 1


def test_a_client_that_disconnects_before_a_plain_answer_frees_its_blocks(small: Small) -> None:
    aborted = small.service.loop.stats.aborted
    host, port = small.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": [100, 101, 102], "max_tokens": 64, "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while small.free_blocks() == BLOCKS and time.monotonic() < deadline:
            time.sleep(0.02)  # until the engine holds the request's blocks
    assert _wait_for_free(small) == BLOCKS
    assert small.service.loop.stats.aborted == aborted + 1


def test_a_client_that_disconnects_mid_sse_frees_its_blocks(small: Small) -> None:
    aborted = small.service.loop.stats.aborted
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 48}
    with (
        httpx.Client(base_url=small.url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "temperature": 0}) as r,
    ):
        assert r.status_code == 200
        events = r.iter_lines()
        assert next(events).startswith("data: ")
        assert small.free_blocks() < BLOCKS  # the request holds blocks while it streams
    assert _wait_for_free(small) == BLOCKS
    assert small.service.loop.stats.aborted == aborted + 1


def test_a_stopped_engine_answers_503(loaded) -> None:
    engine = EngineConfig(transport=TransportKind.PLAIN, num_device_blocks=2, num_host_blocks=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with InferenceService(loaded, "stopped", Limits(8, 4), engine) as service:
            app = create_app(service, Verifier(Policy(frozenset(), frozenset())))
            with ServerThread(app) as server:
                service.close()
                response = _complete(server.url, [100, 101], 2)
                metrics = httpx.get(f"{server.url}/metrics").text
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"
    assert "veil_engine_up 0.0" in metrics


def test_split_inference_embeddings_share_the_engine_with_plain_requests(small: Small, loaded) -> None:
    ids = loaded.tokenizer("Where is the Eiffel Tower?", add_special_tokens=False).input_ids
    embeds = loaded.model.embed_tokens.weight[ids].detach()[None]
    results: dict[str, list[int]] = {}

    def cmif() -> None:
        with httpx.Client(base_url=small.url, timeout=300) as http:
            body = wire.encode({"embeddings": embeds})
            lines = http.post("/v1/cmif/generate?max_tokens=12", content=body).text.splitlines()
        results["cmif"] = [json.loads(line)["token_id"] for line in lines[:-1]]

    thread = threading.Thread(target=cmif)
    thread.start()
    plain = _complete(small.url, ids, 12).json()["veil"]["token_ids"]
    thread.join()
    assert results["cmif"] == plain == _alone(loaded, ids, 12)


def test_the_partition_baseline_runs_between_engine_steps(small: Small, loaded) -> None:
    x = torch.randn(1, 3, loaded.config.hidden_size)
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(_complete, small.url, [100, 101, 102], 16)
        y = small.service.linear(0, "wo", x)
        assert busy.result().status_code == 200
    assert torch.allclose(y, x @ loaded.model.layers[0].weights().wo.T)
