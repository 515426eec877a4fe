"""The OpenAI-compatible API through the official `openai` client, over real HTTP on loopback:
greedy answers equal the engine's offline output, plain and streamed; sampling, seeds and stop strings
are honoured; every unsupported or out-of-range parameter gets its status and error object."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import API_KEY, MODEL_ID, Served
from veil.model.generate import GenerationRequest, generate
from veil.server.openai_protocol import Message, chat_prompt_ids

PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def http(served: Served) -> Iterator[httpx.Client]:
    with served.client() as c:
        yield c


def _offline(served: Served, ids: list[int], max_tokens: int = NEW_TOKENS) -> list[int]:
    """The engine's greedy answer computed offline, cut after the first stop token (kept)."""
    stops = served.loaded.stop_token_ids
    out = generate(
        served.loaded.model, GenerationRequest(max_tokens, prompt_ids=[ids], stop_token_ids=stops)
    )[0]
    return out[: next((i + 1 for i, t in enumerate(out) if t in stops), len(out))]


def _text(served: Served, ids: list[int]) -> str:
    return served.loaded.tokenizer.decode(ids, skip_special_tokens=True)


def _completion_ids(served: Served) -> list[int]:
    return list(served.loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])


def _chat_ids(served: Served) -> list[int]:
    return chat_prompt_ids([Message(role="user", content=QUESTION)], served.loaded.tokenizer)


def test_completion_equals_offline_greedy_plain_and_streamed(served: Served, client: openai.OpenAI) -> None:
    ids = _completion_ids(served)
    expected = _offline(served, ids)
    plain = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert plain.choices[0].text == _text(served, expected)
    assert plain.model == MODEL_ID and plain.id.startswith("cmpl-") and plain.created > 0
    assert plain.usage is not None and plain.usage.prompt_tokens == len(ids)
    assert plain.usage.completion_tokens == len(expected) == plain.usage.total_tokens - len(ids)
    assert plain.choices[0].finish_reason == ("stop" if len(expected) < NEW_TOKENS else "length")
    chunks = list(
        client.completions.create(
            model=MODEL_ID,
            prompt=PROMPT,
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage == plain.usage and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1


def test_chat_equals_offline_greedy_plain_and_streamed(served: Served, client: openai.OpenAI) -> None:
    expected = _offline(served, _chat_ids(served))
    messages = [{"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_completion_tokens=NEW_TOKENS, temperature=0
    )
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == _text(served, expected)
    assert plain.usage is not None and plain.usage.completion_tokens == len(expected)
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_sse_ends_with_done(served: Served, http: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0].removeprefix("data: "))["object"] == "text_completion"


def test_stop_string_cuts_the_text_plain_and_streamed(served: Served, client: openai.OpenAI) -> None:
    full = _text(served, _offline(served, _completion_ids(served), 12))
    stop = full.strip().split()[1]  # the second word of the greedy answer
    before = full[: full.index(stop)]
    kwargs = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": [stop]}
    plain = client.completions.create(**kwargs)
    assert plain.choices[0].text == before and plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None and plain.usage.completion_tokens < 12
    chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == before
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(
    served: Served, client: openai.OpenAI
) -> None:
    def sample(seed: int) -> str:
        kwargs = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 2.0}
        return client.completions.create(**kwargs, seed=seed).choices[0].text  # type: ignore[arg-type]

    seeds = [sample(s) for s in (1, 2)]
    assert sample(1) == seeds[0]
    assert len(set(seeds)) > 1  # sampled, not greedy


def test_models_lists_the_served_model_and_an_omitted_model_is_the_served_one(
    served: Served, client: openai.OpenAI, http: httpx.Client
) -> None:
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    response = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 1, "temperature": 0})
    assert response.status_code == 200 and response.json()["model"] == MODEL_ID


def test_unknown_model_is_404_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=1)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], n=2)


LONG = list(range(100, 170))  # 70 tokens: over the fixture's 64
BAD_COMPLETIONS = [
    ("bad-json", b'{"prompt": "x",', 400, None, "invalid_json"),
    ("not-an-object", b"[1, 2]", 400, None, None),
    ("no-prompt", {"max_tokens": 1}, 400, "prompt", None),
    ("unknown-model", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("max-tokens-0", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("max-tokens-over-limit", {"prompt": "x", "max_tokens": 17}, 400, "max_tokens", None),
    ("temperature-negative", {"prompt": "x", "temperature": -1}, 400, "temperature", None),
    ("temperature-over-2", {"prompt": "x", "temperature": 2.5}, 400, "temperature", None),
    ("top-p-0", {"prompt": "x", "top_p": 0}, 400, "top_p", None),
    ("top-p-over-1", {"prompt": "x", "top_p": 1.5}, 400, "top_p", None),
    ("seed-out-of-range", {"prompt": "x", "seed": 2**70}, 400, "seed", None),
    ("n-2", {"prompt": "x", "n": 2}, 400, "n", None),
    ("logprobs", {"prompt": "x", "logprobs": 2}, 400, "logprobs", "unsupported"),
    ("logprobs-0", {"prompt": "x", "logprobs": 0}, 400, "logprobs", "unsupported"),
    ("echo", {"prompt": "x", "echo": True}, 400, "echo", "unsupported"),
    ("best-of", {"prompt": "x", "best_of": 2}, 400, "best_of", "unsupported"),
    ("presence-penalty", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported"),
    ("frequency-penalty", {"prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty", "unsupported"),
    ("logit-bias", {"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias", "unsupported"),
    ("suffix", {"prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported"),
    ("unknown-argument", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate", None),
    ("too-many-stops", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("empty-stop", {"prompt": "x", "stop": ""}, 400, "stop", None),
    ("stream-options-without-stream", {"prompt": "x", "stream_options": {}}, 400, "stream_options", None),
    ("prompt-too-long", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("empty-prompt", {"prompt": ""}, 400, "prompt", None),
    ("batch-of-prompts", {"prompt": ["a", "b"]}, 400, "prompt", None),
    ("token-out-of-vocab", {"prompt": [10**9]}, 400, "prompt", None),
    ("body-too-large", {"prompt": "word " * 20000}, 413, None, "body_too_large"),
]
BAD_CHATS = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported"),
    ("logprobs", {"logprobs": True}, 400, "logprobs", "unsupported"),
    ("response-format", {"response_format": {"type": "json_object"}}, 400, "response_format", "unsupported"),
    ("two-max-tokens", {"max_tokens": 2, "max_completion_tokens": 3}, 400, "max_completion_tokens", None),
    ("max-completion-tokens-over", {"max_completion_tokens": 17}, 400, "max_completion_tokens", None),
    ("empty-messages", {"messages": []}, 400, "messages", None),
    ("tool-role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages", None),
    (
        "image-part",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
        None,
    ),
    ("too-long", {"messages": [{"role": "user", "content": "word " * 80}]}, 400, "messages", None),
]


def _post(http: httpx.Client, path: str, body: object) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=raw, headers={"content-type": "application/json"})


def _assert_error(response: httpx.Response, status: int, param: str | None, code: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize(
    ("body", "status", "param", "code"), [c[1:] for c in BAD_COMPLETIONS], ids=[c[0] for c in BAD_COMPLETIONS]
)
def test_bad_completion_requests_get_their_status_and_error_object(
    http: httpx.Client, body: object, status: int, param: str | None, code: str | None
) -> None:
    _assert_error(_post(http, "/v1/completions", body), status, param, code)


@pytest.mark.parametrize(
    ("extra", "status", "param", "code"), [c[1:] for c in BAD_CHATS], ids=[c[0] for c in BAD_CHATS]
)
def test_bad_chat_requests_get_their_status_and_error_object(
    http: httpx.Client, extra: dict[str, object], status: int, param: str | None, code: str | None
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    response = _post(http, "/v1/chat/completions", body)
    if param == "messages":
        assert response.status_code == status and response.json()["error"]["param"].startswith("messages")
    else:
        _assert_error(response, status, param, code)


def test_neutral_values_of_unsupported_parameters_are_accepted(http: httpx.Client) -> None:
    neutral = {
        "n": 1,
        "logprobs": None,
        "echo": False,
        "best_of": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "user": "alice",
    }
    response = _post(
        http, "/v1/completions", {"prompt": [5, 6], "max_tokens": 1, "temperature": 0, **neutral}
    )
    assert response.status_code == 200, response.text


def test_unknown_routes_and_cmif_errors_use_the_error_object(http: httpx.Client) -> None:
    assert http.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    response = http.post("/v1/cmif/generate?max_tokens=0", content=b"")
    assert response.status_code == 422 and response.json()["error"]["param"] == "max_tokens"


def test_api_key_guards_v1_but_not_health_or_metrics(keyed: str) -> None:
    with httpx.Client(base_url=keyed, timeout=60) as anonymous:
        for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/cmif/challenge"):
            response = anonymous.post(path, json={}) if path != "/v1/models" else anonymous.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"]["type"] == "authentication_error"
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
        wrong = anonymous.get("/v1/models", headers={"authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        keyed_header = {"authorization": f"Bearer {API_KEY}"}
        assert anonymous.post("/v1/cmif/challenge", headers=keyed_header).status_code == 200
    with openai.OpenAI(base_url=f"{keyed}/v1", api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with openai.OpenAI(base_url=f"{keyed}/v1", api_key=API_KEY, max_retries=0, timeout=60) as good:
        answer = good.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=1, temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens == 1


def _metrics(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_parse_and_move_after_a_request(
    served: Served, http: httpx.Client, client: openai.OpenAI
) -> None:
    before, compute_s = _metrics(http), served.service.compute_s
    answer = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3, temperature=0)
    after = _metrics(http)
    assert answer.usage is not None and served.service.compute_s > compute_s
    ok = ("veil_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    assert after[ok] == before.get(ok, 0.0) + 1
    generated = ("veil_generation_tokens_total", ())
    assert after[generated] - before[generated] == answer.usage.completion_tokens
    prompt = ("veil_prompt_tokens_total", ())
    assert after[prompt] - before[prompt] == answer.usage.prompt_tokens
    ttft = ("veil_time_to_first_token_seconds_count", ())
    assert after[ttft] == before[ttft] + 1
    assert after[("veil_engine_steps_total", ())] > before[("veil_engine_steps_total", ())]
    assert after[("veil_engine_up", ())] == 1.0
    # the fixture's default transport is pipellm: bytes sealed each way, speculation counters
    assert after[("veil_sealed_bytes_total", (("direction", "h2d"),))] > 0
    assert 0.0 <= after[("veil_pipellm_hit_rate", ())] <= 1.0
    for name in (
        "veil_pipellm_wasted_bytes_total",
        "veil_engine_preemptions_total",
        "veil_pipellm_hits_total",
    ):
        assert (name, ()) in after
    assert ("veil_kv_bytes_swapped_total", (("direction", "out"),)) in after
