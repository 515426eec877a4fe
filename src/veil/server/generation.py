"""The engine's token streams as the endpoints use them: refusals as API errors, counted in the
metrics, cut at stop strings, and abandoned (the request aborted, its KV blocks freed) when the client
leaves. Shared by the OpenAI and the CMIF endpoints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from fastapi import Request

from veil.engine.loop import EngineStopped
from veil.model.sampling import SamplingParams
from veil.server.errors import ApiError
from veil.server.metrics import ServerMetrics
from veil.server.service import InferenceService, Token
from veil.server.stops import StopMatcher

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25


async def tokens(
    service: InferenceService,
    metrics: ServerMetrics,
    params: SamplingParams,
    *,
    ids: list[int] | None = None,
    embeds: torch.Tensor | None = None,
    adapter: str | None = None,
) -> AsyncIterator[Token]:
    """The service's token stream, its refusals as API errors (400: never fits; 503: engine down).
    Closing it early aborts the request."""
    started = time.perf_counter()
    first = True
    try:
        stream = service.generate(params, prompt_ids=ids, prompt_embeds=embeds, adapter=adapter)
        async with aclosing(stream):
            async for token in stream:
                if first:
                    metrics.prompt_tokens.inc(len(ids) if ids is not None else int(embeds.shape[1]))  # type: ignore[union-attr]
                    metrics.time_to_first_token.observe(time.perf_counter() - started)
                    first = False
                metrics.generated_tokens.inc()
                yield token
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    except EngineStopped as exc:
        raise ApiError(503, str(exc), code="engine_stopped") from None


@dataclass
class Produced:
    """What a request produced so far (filled while its text streams)."""

    token_ids: list[int] = field(default_factory=list)
    compute_s: float = 0.0
    finish_reason: str | None = None

    @property
    def finish(self) -> str:
        return self.finish_reason or "length"


async def text(
    stream: AsyncIterator[Token], stops: tuple[str, ...], produced: Produced
) -> AsyncIterator[str]:
    """Non-empty text pieces of `stream`, ending before the first stop string (finish "stop"; the
    request is aborted there). Fills `produced` as tokens arrive."""
    matcher = StopMatcher(stops)
    async with aclosing(stream):
        async for token in stream:
            produced.token_ids.append(token.token_id)
            produced.compute_s += token.compute_s
            piece, stopped = matcher.feed(token.text)
            if stopped:
                produced.finish_reason = "stop"
            elif token.finish_reason is not None:
                produced.finish_reason = token.finish_reason
                piece += matcher.flush()
            if piece:
                yield piece
            if stopped:
                return


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """The result of `awaitable`, or 499 (and `awaitable` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(awaitable)
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()  # closes the stream: the engine aborts the request and frees its blocks
            await asyncio.gather(task, return_exceptions=True)
            raise ApiError(499, "client disconnected")
    return task.result()


async def first(items: AsyncIterator[T]) -> T | None:
    """The first item (None if there is none); its errors are raised here, before a response starts."""
    try:
        return await anext(items)
    except StopAsyncIteration:
        return None


async def collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]
