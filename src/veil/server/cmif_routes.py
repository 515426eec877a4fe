"""The CMIF split-inference endpoints, and the per-layer partition baseline's.

    POST /v1/cmif/challenge           a one-time attestation nonce
    POST /v1/cmif/provision           evidence (JSON) -> embedding weights HPKE-wrapped for the enclave
    POST /v1/cmif/generate            prompt embeddings (safetensors) -> NDJSON token stream
    POST /v1/partition/{layer}/{op}   the per-layer partition baseline (only if enabled; only for an
                                      attested session; never the head when it is the embedding table)

Embeddings that do not fit the model (shape, length, values) are 422; an unreadable tensor 400.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from veil import wire
from veil.attest.evidence import Evidence, VerificationError
from veil.attest.verifier import Verifier
from veil.model.sampling import SamplingParams
from veil.server import generation
from veil.server.errors import ApiError
from veil.server.metrics import ServerMetrics
from veil.server.protocol import read_body
from veil.server.service import InferenceService, Limits, Token
from veil.server.sessions import SessionStore

log = logging.getLogger("veil.server")
NDJSON = "application/x-ndjson"


def cmif_router(
    service: InferenceService,
    verifier: Verifier,
    metrics: ServerMetrics,
    auth: Callable[[Request], None],
    sessions: SessionStore | None,
) -> APIRouter:
    """The CMIF endpoints; `sessions` (if the partition baseline is on) get a token per provisioning."""
    router = APIRouter(dependencies=[Depends(auth)])
    limits = service.limits

    @router.post("/v1/cmif/challenge")
    def challenge() -> dict[str, object]:
        return {"nonce": verifier.challenge().hex(), "expires_in_s": verifier.policy.nonce_ttl_s}

    @router.post("/v1/cmif/provision")
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
            raise ApiError(403, "attestation failed", code="attestation_failed") from None
        if sessions is not None:
            sessions.admit(token)
        return Response(blob, media_type=wire.MEDIA_TYPE)

    @router.post("/v1/cmif/generate")
    async def generate(request: Request, max_tokens: int = Query(16, ge=1)) -> StreamingResponse:
        if max_tokens > limits.max_new_tokens:
            raise ApiError(400, f"max_tokens must be <= {limits.max_new_tokens}", param="max_tokens")
        embeds = _embeddings(await read_body(request, limits.max_body_bytes), service)
        tokens = generation.tokens(service, metrics, SamplingParams(max_tokens=max_tokens), embeds=embeds)
        first = await generation.first(tokens)  # a refusal is still an HTTP error, not a broken stream
        return StreamingResponse(_ndjson(first, tokens), media_type=NDJSON)

    return router


def partition_router(service: InferenceService, sessions: SessionStore) -> APIRouter:
    """The partition baseline; its `Authorization` header is the attested session's token."""
    router = APIRouter()
    limits = service.limits

    @router.post("/v1/partition/{layer}/{op}")
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

    return router


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
    finish = (done[-1].finish_reason if done else None) or "length"
    yield _line({"done": True, "finish_reason": finish, "server_compute_s": compute_s})


def _line(obj: dict[str, object]) -> bytes:
    return json.dumps(obj).encode() + b"\n"
