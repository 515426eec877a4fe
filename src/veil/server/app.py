"""The HTTP API (FastAPI), built by `create_app`. No module-level state: everything hangs off the app.

Endpoints:
    GET  /health                      liveness and the model's name
    GET  /v1/models                   the one model served (OpenAI shape)
    POST /v1/completions              plain inference, server-side tokenization (no protection)
    POST /v1/cmif/challenge           a one-time attestation nonce
    POST /v1/cmif/provision           evidence (JSON) -> embedding weights HPKE-wrapped for the enclave
    POST /v1/cmif/generate            prompt embeddings (safetensors) -> NDJSON token stream
    POST /v1/partition/{layer}/{op}   the per-layer partition baseline (only if enabled; only for an
                                      attested session; never the head when it is the embedding table)

Every body is size-checked while it is read, before it is parsed.

Generation runs on the service's engine: concurrent requests are batched; a prompt that can never fit
the KV cache is a 400; a client that disconnects has its request aborted (its KV blocks freed).

Every client error is a 4xx with `{"error": "..."}` (503 if the engine stopped); verification failures
say only that.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from veil import wire
from veil.attest.evidence import Evidence, VerificationError
from veil.attest.verifier import Verifier
from veil.engine.loop import EngineStopped
from veil.model.sampling import SamplingParams
from veil.server.protocol import ApiError, CompletionRequest, read_body
from veil.server.service import InferenceService, Limits, Token
from veil.server.sessions import SessionStore

log = logging.getLogger("veil.server")
_RECENT_REQUESTS = 1024
_DISCONNECT_POLL_S = 0.25
NDJSON = "application/x-ndjson"


def create_app(service: InferenceService, verifier: Verifier, *, enable_partition: bool = False) -> FastAPI:
    """The app serving `service`, provisioning enclaves that satisfy `verifier`'s policy."""
    app = FastAPI(title="veil", version="0.1.0")
    sessions = SessionStore() if enable_partition else None
    # (method, path) of the most recent requests, for tests and operators; bounded so a long-running
    # server does not grow without limit.
    app.state.requests = deque(maxlen=_RECENT_REQUESTS)
    limits = service.limits

    app.add_middleware(_RecordRequests, log=app.state.requests)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"invalid request: {exc.errors()[:3]}"}, status_code=422)

    @app.get("/health")
    def health() -> dict[str, object]:
        allowed = {"max_prompt_tokens": limits.max_prompt_tokens, "max_new_tokens": limits.max_new_tokens}
        return {"status": "ok", "model": service.model_id, "limits": allowed}

    @app.get("/v1/models")
    def models() -> dict[str, object]:
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "owned_by": "veil"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, object]:
        # the size limit applies before any parsing, the token limit before generation
        body = CompletionRequest.parse(await read_body(request, limits.json_body_bytes), limits)
        ids = await run_in_threadpool(body.prompt_ids, service.loaded.tokenizer, limits)
        params = SamplingParams(max_tokens=body.max_tokens)
        tokens = await _collect(request, _tokens(service, params, ids=ids))
        return {
            "object": "text_completion",
            "model": service.model_id,
            "choices": [
                {"index": 0, "text": "".join(t.text for t in tokens), "finish_reason": _finish(tokens)}
            ],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(tokens)},
            "veil": {
                "token_ids": [t.token_id for t in tokens],
                "server_compute_s": sum(t.compute_s for t in tokens),
            },
        }

    @app.post("/v1/cmif/challenge")
    def challenge() -> dict[str, object]:
        return {"nonce": verifier.challenge().hex(), "expires_in_s": verifier.policy.nonce_ttl_s}

    @app.post("/v1/cmif/provision")
    async def provision(request: Request) -> Response:
        raw = await read_body(request, 64 << 10)
        try:
            evidence = Evidence.from_json(json.loads(raw))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        token = sessions.new_token() if sessions is not None else b""
        try:  # the wrap encrypts the whole embedding table: off the event loop
            blob = await run_in_threadpool(service.provision, verifier, evidence, token)
        except VerificationError as exc:
            log.warning("provisioning refused: %s", exc.reason)
            raise ApiError(403, "attestation failed") from None
        if sessions is not None:
            sessions.admit(token)
        return Response(blob, media_type=wire.MEDIA_TYPE)

    @app.post("/v1/cmif/generate")
    async def generate(request: Request, max_tokens: int = Query(16, ge=1)) -> StreamingResponse:
        if max_tokens > limits.max_new_tokens:
            raise ApiError(400, f"max_tokens must be <= {limits.max_new_tokens}")
        embeds = _embeddings(await read_body(request, limits.max_body_bytes), service)
        tokens = _tokens(service, SamplingParams(max_tokens=max_tokens), embeds=embeds)
        first = await _first(tokens)  # a refusal is still an HTTP error, not a broken stream
        return StreamingResponse(_ndjson(first, tokens), media_type=NDJSON)

    if sessions is not None:

        @app.post("/v1/partition/{layer}/{op}")
        async def partition(request: Request, layer: int, op: str) -> Response:
            if not sessions.valid(request.headers.get("authorization")):
                raise ApiError(401, "the partition endpoints need an attested session")
            if op == "head" and service.loaded.config.tie_word_embeddings:
                raise ApiError(403, "the head is the embedding table: compute it in the enclave")
            x = _tensor(await read_body(request, limits.max_body_bytes), "x", limits)
            try:
                out = await run_in_threadpool(service.linear, layer, op, x)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from None
            return Response(wire.encode({"y": out}), media_type=wire.MEDIA_TYPE)

    return app


class _RecordRequests:
    """Pure ASGI middleware noting (method, path) of each request. Not `@app.middleware("http")`:
    that wrapper buffers the receive channel, and `Request.is_disconnected` then never sees a client
    leave, so an abandoned request would run to its end."""

    def __init__(self, app: ASGIApp, log: deque[tuple[str, str]]) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.log.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


def _tensor(raw: bytes, name: str, limits: Limits) -> torch.Tensor:
    """The one float32 tensor `name` of a request body, refused before allocation if out of bounds."""
    bounds = wire.Bounds(max_dim=limits.max_dim, max_elements=limits.max_body_bytes // 4)
    try:
        return wire.decode(raw, names=(name,), dtypes=frozenset({torch.float32}), bounds=bounds)[name]
    except wire.WireFormatError as exc:
        raise ApiError(400, str(exc)) from None


def _embeddings(raw: bytes, service: InferenceService) -> torch.Tensor:
    """Prompt embeddings checked against the model: float32, (1, T, hidden), 1 <= T <= limit, finite."""
    x = _tensor(raw, "embeddings", service.limits)
    hidden, max_t = service.hidden_size, service.limits.max_prompt_tokens
    if x.dtype != torch.float32:
        raise ApiError(422, f"embeddings must be float32, got {x.dtype}")
    if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != hidden:
        raise ApiError(422, f"embeddings must have shape (1, T, {hidden}), got {tuple(x.shape)}")
    if not 1 <= x.shape[1] <= max_t:
        raise ApiError(422, f"prompt length T must be in 1..{max_t}, got {x.shape[1]}")
    if not bool(torch.isfinite(x).all()):
        raise ApiError(422, "embeddings must be finite")
    if float(x.abs().max()) > service.embedding_bound:  # finite but huge overflows to NaN in the model
        raise ApiError(422, f"embedding values must lie within +-{service.embedding_bound:.3g}")
    return x


async def _tokens(
    service: InferenceService,
    params: SamplingParams,
    *,
    ids: list[int] | None = None,
    embeds: torch.Tensor | None = None,
) -> AsyncIterator[Token]:
    """The service's token stream, its refusals as API errors (400: never fits; 503: engine down)."""
    try:
        async for token in service.generate(params, prompt_ids=ids, prompt_embeds=embeds):
            yield token
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    except EngineStopped as exc:
        raise ApiError(503, str(exc)) from None


async def _first(tokens: AsyncIterator[Token]) -> Token | None:
    try:
        return await anext(tokens)
    except StopAsyncIteration:
        return None


async def _collect(request: Request, tokens: AsyncIterator[Token]) -> list[Token]:
    """Every token of a non-streamed request; a client that disconnects first aborts it."""
    collected: list[Token] = []

    async def gather() -> None:
        async for token in tokens:
            collected.append(token)

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()  # closes the stream: the engine aborts the request and frees its blocks
            await asyncio.gather(task, return_exceptions=True)
            raise ApiError(499, "client disconnected")
    task.result()
    return collected


async def _ndjson(first: Token | None, tokens: AsyncIterator[Token]) -> AsyncIterator[bytes]:
    """Lines of the CMIF stream; a client that disconnects closes this generator, which aborts the
    request in the engine."""
    done: list[Token] = []
    if first is not None:
        done.append(first)
        yield _line({"token_id": first.token_id, "text": first.text})
        async for token in tokens:
            done.append(token)
            yield _line({"token_id": token.token_id, "text": token.text})
    compute_s = sum(t.compute_s for t in done)
    yield _line({"done": True, "finish_reason": _finish(done), "server_compute_s": compute_s})


def _line(obj: dict[str, object]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _finish(tokens: list[Token]) -> str:
    return (tokens[-1].finish_reason if tokens else None) or "length"
