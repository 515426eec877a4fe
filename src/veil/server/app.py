"""The HTTP API (FastAPI), built by `create_app`. No module-level state: everything hangs off the app.

Endpoints:
    GET  /health                      liveness, the model's name and the request limits (always open)
    GET  /metrics                     Prometheus text format (always open; `veil.server.metrics`)
    GET  /v1/models                   the one model served
    POST /v1/completions              OpenAI-compatible, plain inference (`veil.server.openai_routes`)
    POST /v1/chat/completions         the same through the model's chat template
    POST /v1/cmif/...                 split inference (`veil.server.cmif_routes`)
    POST /v1/partition/{layer}/{op}   the per-layer partition baseline (only if enabled)

Every body is size-checked while it is read, before it is parsed. Every error, on every endpoint, is
an OpenAI error object (`veil.server.errors`). With `api_key`, the `/v1` endpoints need it
(`veil.server.auth`). Generation runs on the service's engine: concurrent requests are batched; a
client that disconnects has its request aborted (its KV blocks freed).
"""

from __future__ import annotations

import logging
import time
from collections import deque

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from veil.attest.verifier import Verifier
from veil.server.auth import api_key_check
from veil.server.cmif_routes import cmif_router, partition_router
from veil.server.errors import ApiError
from veil.server.metrics import CONTENT_TYPE, ServerMetrics
from veil.server.openai_routes import openai_router
from veil.server.service import InferenceService
from veil.server.sessions import SessionStore

log = logging.getLogger("veil.server")
_RECENT_REQUESTS = 1024


def create_app(
    service: InferenceService,
    verifier: Verifier,
    *,
    enable_partition: bool = False,
    api_key: str | None = None,
) -> FastAPI:
    """The app serving `service`, provisioning enclaves that satisfy `verifier`'s policy; with
    `api_key`, the `/v1` endpoints need `Authorization: Bearer <api_key>` (see `veil.server.auth`)."""
    app = FastAPI(title="veil", version="0.1.0")
    metrics = ServerMetrics(service.stats)
    sessions = SessionStore() if enable_partition else None
    auth = api_key_check(api_key)
    # (method, path) of the most recent requests, for tests and operators; bounded so a long-running
    # server does not grow without limit.
    app.state.requests = deque(maxlen=_RECENT_REQUESTS)
    app.state.metrics = metrics
    app.add_middleware(_Observe, log=app.state.requests, metrics=metrics)
    _error_handlers(app)

    @app.get("/health")
    def health() -> dict[str, object]:
        limits = service.limits
        allowed = {"max_prompt_tokens": limits.max_prompt_tokens, "max_new_tokens": limits.max_new_tokens}
        return {"status": "ok", "model": service.model_id, "limits": allowed}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE)

    app.include_router(openai_router(service, metrics, auth))
    app.include_router(cmif_router(service, verifier, metrics, auth, sessions))
    if sessions is not None:
        app.include_router(partition_router(service, sessions))
    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        param = str(error["loc"][-1]) if error.get("loc") else None
        return ApiError(422, f"invalid {param}: {error['msg']}", param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, "internal server error").response()


class _Observe:
    """Pure ASGI middleware: notes (method, path) of each request and counts it in the metrics by
    endpoint (the route's template) and status, with its latency to the end of the response body.
    Not `@app.middleware("http")`: that wrapper buffers the receive channel, and
    `Request.is_disconnected` then never sees a client leave, so an abandoned request would run on."""

    def __init__(self, app: ASGIApp, log: deque[tuple[str, str]], metrics: ServerMetrics) -> None:
        self.app, self.log, self.metrics = app, log, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.log.append((scope["method"], scope["path"]))
        started, status = time.perf_counter(), [500]

        async def observe(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - started)
