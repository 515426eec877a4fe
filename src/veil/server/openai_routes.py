"""OpenAI-compatible endpoints: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

A request is parsed and checked (`openai_protocol`), tokenized off the event loop, and run as one
engine request. Non-streamed: the whole answer once done (a client that leaves first has its request
aborted). Streamed (`stream: true`): server-sent events, one `data: {chunk}` per text piece (chunks
shaped as OpenAI's: `text_completion`, or `chat.completion.chunk` with `delta`), a last chunk with the
finish reason, the usage chunk if `stream_options.include_usage`, then `data: [DONE]`. A refusal
before the first token is an HTTP error; an engine that stops mid-stream ends the stream with an
error event. A client that disconnects mid-stream has its request aborted and its blocks freed.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from veil.server import generation
from veil.server.errors import ApiError
from veil.server.metrics import ServerMetrics
from veil.server.openai_protocol import GenerationSpec, parse_chat, parse_completion
from veil.server.protocol import read_body
from veil.server.service import InferenceService

EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True)
class _Shape:
    """How one endpoint shapes its answers (OpenAI's completions or chat completions)."""

    object: str  # non-streamed answer
    chunk_object: str  # streamed chunk
    id_prefix: str
    chat: bool

    def choice(self, text: str, finish: str | None) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def delta(self, text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


COMPLETION = _Shape("text_completion", "text_completion", "cmpl-", chat=False)
CHAT = _Shape("chat.completion", "chat.completion.chunk", "chatcmpl-", chat=True)


def openai_router(
    service: InferenceService, metrics: ServerMetrics, auth: Callable[[Request], None]
) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)])
    limits, tokenizer = service.limits, service.loaded.tokenizer
    started = int(time.time())

    @router.get("/v1/models")
    def models() -> dict[str, object]:
        model = {"id": service.model_id, "object": "model", "created": started, "owned_by": "veil"}
        adapters = [
            {**model, "id": name, "root": name, "parent": service.model_id} for name in service.adapters
        ]
        return {"object": "list", "data": [model, *adapters]}

    @router.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> dict[str, object] | StreamingResponse:
        raw = await read_body(request, limits.json_body_bytes)  # the size limit applies before parsing
        spec = await run_in_threadpool(
            parse_completion, raw, tokenizer, service.model_id, limits, service.adapters
        )
        return await _answer(request, service, metrics, spec, COMPLETION)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> dict[str, object] | StreamingResponse:
        raw = await read_body(request, limits.json_body_bytes)
        spec = await run_in_threadpool(parse_chat, raw, tokenizer, service.model_id, limits, service.adapters)
        return await _answer(request, service, metrics, spec, CHAT)

    return router


async def _answer(
    request: Request, service: InferenceService, metrics: ServerMetrics, spec: GenerationSpec, shape: _Shape
) -> dict[str, object] | StreamingResponse:
    produced = generation.Produced()
    tokens = generation.tokens(service, metrics, spec.params, ids=spec.prompt_ids, adapter=spec.adapter)
    pieces = generation.text(tokens, spec.stops, produced)
    head = {"id": shape.id_prefix + secrets.token_hex(12), "created": int(time.time()), "model": spec.model}
    if not spec.stream:
        text = "".join(await generation.until_disconnect(request, generation.collect(pieces)))
        return {
            **head,
            "object": shape.object,
            "choices": [shape.choice(text, produced.finish)],
            "usage": _usage(spec, produced),
            "veil": {"token_ids": produced.token_ids, "server_compute_s": produced.compute_s},
        }
    first = await generation.until_disconnect(request, generation.first(pieces))  # refusals: HTTP errors
    events = _events(first, pieces, produced, spec, shape, {**head, "object": shape.chunk_object})
    return StreamingResponse(events, media_type=EVENT_STREAM, headers={"cache-control": "no-cache"})


async def _events(
    first: str | None,
    pieces: AsyncIterator[str],
    produced: generation.Produced,
    spec: GenerationSpec,
    shape: _Shape,
    head: dict[str, object],
) -> AsyncIterator[bytes]:
    """The SSE body. Leaving it early (the client went away) closes `pieces`: the request is aborted."""
    usage: dict[str, object] = {"usage": None} if spec.include_usage else {}

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        return _event({**head, "choices": choices, **usage})

    if shape.chat:
        yield chunk([shape.delta("", None, role=True)])
    try:
        if first is not None:
            yield chunk([shape.delta(first, None)])
            async for piece in pieces:
                yield chunk([shape.delta(piece, None)])
    except ApiError as exc:  # the engine stopped mid-stream: the client sees an error event
        yield _event(exc.body())
        return
    yield chunk([shape.delta(None, produced.finish)])
    if spec.include_usage:
        yield _event({**head, "choices": [], "usage": _usage(spec, produced)})
    yield b"data: [DONE]\n\n"


def _usage(spec: GenerationSpec, produced: generation.Produced) -> dict[str, int]:
    prompt, completion = len(spec.prompt_ids), len(produced.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event(obj: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
