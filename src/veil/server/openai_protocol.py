"""OpenAI's completions and chat-completions requests: parsed, checked, and turned into what the
engine runs. Pure apart from the tokenizer: no I/O, no clock.

Every field of a request is honoured, or refused with a 400 that names it; none is silently ignored:
- honoured: `model`, `prompt` (one text or one list of token ids) / `messages` (through the
  tokenizer's chat template), `max_tokens` (`max_completion_tokens` for chat), `temperature` (default
  1.0; 0 is greedy), `top_p`, `seed`, `stop` (up to 4 strings), `stream`, `stream_options.include_usage`,
  `n` = 1, `user` (an end-user id for the operator's logs: it never changes an answer), and the
  extension `top_k` (vLLM's spelling);
- accepted only at their neutral value (what a client that does not use them sends):
  `REFUSED_UNLESS_NEUTRAL`;
- anything else is an unrecognized argument.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from veil.model.sampling import SamplingParams
from veil.server.errors import ApiError
from veil.server.service import Limits

MAX_STOPS = 4  # OpenAI's limit
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions (chat: the server's maximum)

# Parameters veil does not implement, with the values that mean "not used" (accepted, changing nothing).
REFUSED_UNLESS_NEUTRAL: dict[str, tuple[object, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None,),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by both endpoints; extras are checked against `REFUSED_UNLESS_NEUTRAL`."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None


class CompletionBody(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None


@dataclass(frozen=True)
class GenerationSpec:
    """What one OpenAI request asks the engine for."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool  # streaming: a last chunk with the usage counts
    adapter: str | None = None  # the LoRA adapter the model name selects (None: the base model)


def resolve_model(
    requested: str | None, served: str, adapters: Collection[str] = ()
) -> tuple[str, str | None]:
    """The model a request names (None: the served one) and the LoRA adapter that selects (None: the
    base model), or 404 `model_not_found`. The one place where a request's `model` is interpreted."""
    if requested is None or requested == served:
        return served, None
    if requested in adapters:
        return requested, requested
    names = ", ".join(repr(n) for n in (served, *adapters))
    raise ApiError(
        404,
        f"the model {requested!r} does not exist; this server serves {names}",
        param="model",
        code="model_not_found",
    )


def parse_completion(
    raw: bytes, tokenizer: Any, served: str, limits: Limits, adapters: Collection[str] = ()
) -> GenerationSpec:
    """A `/v1/completions` body as a `GenerationSpec` (raises `ApiError` 400/404)."""
    body = _validate(CompletionBody, raw)
    model, adapter = resolve_model(body.model, served, adapters)
    ids = _checked_ids(_completion_ids(body.prompt, tokenizer), tokenizer, limits, "prompt")
    default = min(DEFAULT_COMPLETION_TOKENS, limits.max_new_tokens)
    max_tokens = _max_tokens(default if body.max_tokens is None else body.max_tokens, limits, "max_tokens")
    return replace(_spec(body, ids, max_tokens, model), adapter=adapter)


def parse_chat(
    raw: bytes, tokenizer: Any, served: str, limits: Limits, adapters: Collection[str] = ()
) -> GenerationSpec:
    """A `/v1/chat/completions` body as a `GenerationSpec` (raises `ApiError` 400/404)."""
    body = _validate(ChatBody, raw)
    model, adapter = resolve_model(body.model, served, adapters)
    if body.max_tokens is not None and body.max_completion_tokens not in (None, body.max_tokens):
        raise ApiError(
            400,
            "give max_completion_tokens or max_tokens, not two different values",
            param="max_completion_tokens",
        )
    given, param = body.max_completion_tokens, "max_completion_tokens"
    if given is None:
        given, param = body.max_tokens, "max_tokens"
    max_tokens = _max_tokens(limits.max_new_tokens if given is None else given, limits, param)
    ids = _checked_ids(chat_prompt_ids(body.messages, tokenizer), tokenizer, limits, "messages")
    return replace(_spec(body, ids, max_tokens, model), adapter=adapter)


def chat_prompt_ids(messages: list[Message], tokenizer: Any) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, the assistant turn opened."""
    if not messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _validate(model: type[_Request], raw: bytes) -> Any:
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc) from None
    for name, value in (body.model_extra or {}).items():
        if name not in REFUSED_UNLESS_NEUTRAL:
            raise ApiError(400, f"unrecognized request argument supplied: {name}", param=name)
        if not _neutral(value, REFUSED_UNLESS_NEUTRAL[name]):
            raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported")
    return body


def _neutral(value: object, neutral: tuple[object, ...]) -> bool:
    """Whether `value` is one of `neutral`; booleans and numbers kept apart (`logprobs: 0` asks for
    the chosen tokens' log probabilities, `false` for none)."""
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


def _invalid(exc: ValidationError) -> ApiError:
    error = exc.errors(include_url=False)[0]
    if error["type"].startswith("json"):
        return ApiError(400, f"the body is not valid JSON: {error['msg']}", code="invalid_json")
    param = ".".join(str(p) for p in error["loc"] if isinstance(p, str)) or None
    where = ".".join(str(p) for p in error["loc"]) or "body"
    return ApiError(400, f"invalid {where}: {error['msg']}", param=param)


def _completion_ids(prompt: str | list[int] | list[str] | list[list[int]], tokenizer: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(
                400, "one prompt per request: batches of prompts are not supported", param="prompt"
            )
        prompt = prompt[0]  # type: ignore[assignment]
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return list(prompt)  # type: ignore[arg-type]


def _checked_ids(ids: list[int], tokenizer: Any, limits: Limits, param: str) -> list[int]:
    if not ids:
        raise ApiError(400, "the prompt is empty", param=param)
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; this server takes at most {limits.max_prompt_tokens}",
            param=param,
            code="context_length_exceeded",
        )
    if min(ids) < 0 or max(ids) >= len(tokenizer):
        raise ApiError(400, f"token ids must lie in [0, {len(tokenizer)})", param=param)
    return ids


def _max_tokens(value: int, limits: Limits, param: str) -> int:
    if not 1 <= value <= limits.max_new_tokens:
        raise ApiError(400, f"{param} must be in 1..{limits.max_new_tokens}, got {value}", param=param)
    return value


def _spec(body: _Request, ids: list[int], max_tokens: int, model: str) -> GenerationSpec:
    if body.n not in (None, 1):
        raise ApiError(400, "n must be 1: this server returns one choice per request", param="n")
    stream = bool(body.stream)
    if body.stream_options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    return GenerationSpec(
        model,
        ids,
        _sampling(body, max_tokens),
        _stops(body.stop),
        stream,
        body.stream_options is not None and body.stream_options.include_usage,
    )


def _sampling(body: _Request, max_tokens: int) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    top_k = 0 if body.top_k is None else body.top_k
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature")
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if top_k < 0:
        raise ApiError(400, f"top_k must be >= 0, got {top_k}", param="top_k")
    if body.seed is not None and not SEED_RANGE[0] <= body.seed <= SEED_RANGE[1]:
        raise ApiError(400, f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", param="seed")
    return SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, seed=body.seed, max_tokens=max_tokens
    )


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(400, f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
    return stops
