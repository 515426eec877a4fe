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

Every client error is a 4xx with `{"error": "..."}`; verification failures say only that.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterator

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from veil import wire
from veil.attest.evidence import Evidence, VerificationError
from veil.attest.verifier import Verifier
from veil.server.protocol import ApiError, CompletionRequest, read_body
from veil.server.service import InferenceService, Limits, Token
from veil.server.sessions import SessionStore

log = logging.getLogger("veil.server")
_RECENT_REQUESTS = 1024
NDJSON = "application/x-ndjson"


def create_app(service: InferenceService, verifier: Verifier, *, enable_partition: bool = False) -> FastAPI:
    """The app serving `service`, provisioning enclaves that satisfy `verifier`'s policy."""
    app = FastAPI(title="veil", version="0.1.0")
    sessions = SessionStore() if enable_partition else None
    # (method, path) of the most recent requests, for tests and operators; bounded so a long-running
    # server does not grow without limit.
    app.state.requests = deque(maxlen=_RECENT_REQUESTS)
    limits = service.limits

    @app.middleware("http")
    async def record(request: Request, call_next):  # type: ignore[no-untyped-def]
        app.state.requests.append((request.method, request.url.path))
        return await call_next(request)

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
        tokens = await run_in_threadpool(
            lambda: list(service.stream_tokens(prompt_ids=ids, max_new_tokens=body.max_tokens))
        )
        return {
            "object": "text_completion",
            "model": service.model_id,
            "choices": [
                {
                    "index": 0,
                    "text": "".join(t.text for t in tokens),
                    "finish_reason": _finish(service, tokens),
                }
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
        return StreamingResponse(_ndjson(service, embeds, max_tokens), media_type=NDJSON)

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


def _ndjson(service: InferenceService, embeds: torch.Tensor, max_tokens: int) -> Iterator[bytes]:
    tokens: list[Token] = []
    for token in service.stream_tokens(prompt_embeds=embeds, max_new_tokens=max_tokens):
        tokens.append(token)
        yield json.dumps({"token_id": token.token_id, "text": token.text}).encode() + b"\n"
    done = {
        "done": True,
        "finish_reason": _finish(service, tokens),
        "server_compute_s": sum(t.compute_s for t in tokens),
    }
    yield json.dumps(done).encode() + b"\n"


def _finish(service: InferenceService, tokens: list[Token]) -> str:
    return "stop" if tokens and tokens[-1].token_id in service.loaded.config.eos_token_ids else "length"
