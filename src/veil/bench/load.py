"""`veil bench load`: concurrent streaming clients against `veil serve`, per transport.

For each transport (`plain`, `cc`, `pipellm`), one server on the engine starts in this process on
loopback (127.0.0.1, a free port; nothing else is ever contacted). First each prompt is asked once,
non-streamed and greedy (all at once): those answers are the references. Then `--clients` clients
stream greedy `/v1/completions` requests (server-sent events, usage included) back to back for
`--duration` seconds; no request starts after that, and `--max-requests` bounds the total. Every
stream must end in `[DONE]` with its text equal to its prompt's reference: a difference is counted as
lost and duplicated tokens (the reference and the streamed text re-tokenized and diffed). Reported per
transport: errors, lost and duplicated tokens, p50/p99 time to first token and time between tokens as
the clients saw them, generated tokens per second over the run, and the engine's preemptions and KV
blocks swapped (`--kv-blocks` small enough makes requests swap through the transport). The clients
share the process (and its cores) with the server: figures include their cost.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from veil.attest.verifier import Policy, Verifier
from veil.bench.report import emit_json, print_table, progress
from veil.engine.engine import EngineConfig
from veil.errors import UsageError
from veil.model.loader import LoadedModel, load_model
from veil.server.app import create_app
from veil.server.runner import ServerThread
from veil.server.service import InferenceService, Limits
from veil.transport.base import TransportKind

NAME = "load"
HELP = "concurrent streaming clients against the server per transport: errors, lost tokens, TTFT, tokens/s"
PROMPTS = (
    "The capital of France is",
    "Confidential computing protects data in use by",
    "Once upon a time, in a small village, there lived",
    "def fibonacci(n):",
    "The three laws of thermodynamics are",
    "A haiku about the sea:",
    "Encryption keeps secrets because",
    "The best way to learn a language is",
)
HOST = "127.0.0.1"  # loopback only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=4, help="concurrent streaming clients (default 4)")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of load per transport (default 10)"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    parser.add_argument(
        "--max-requests", type=int, default=2000, help="requests per transport at most (default 2000)"
    )
    parser.add_argument(
        "--transports",
        nargs="+",
        choices=[k.value for k in TransportKind],
        default=[k.value for k in TransportKind],
        help="transports to serve (default: all)",
    )
    parser.add_argument(
        "--kv-blocks", type=int, default=None, help="device KV blocks (default: the engine's)"
    )


def run(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.max_tokens < 1 or args.max_requests < 1 or not 0 < args.duration <= 600:
        raise UsageError("--clients, --max-tokens and --max-requests must be >= 1; --duration in (0, 600]")
    loaded = load_model(progress=False)
    result: dict[str, Any] = {
        "clients": args.clients,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
    }
    for kind in args.transports:
        progress(f"bench load: {kind}, {args.clients} clients for {args.duration:g} s")
        config = EngineConfig(
            transport=TransportKind(kind),
            num_device_blocks=args.kv_blocks,
            max_num_seqs=max(args.clients, 64),
        )
        result[kind] = _one_server(loaded, config, args)
    if args.json:
        emit_json(result)
    else:
        keys = (
            "errors",
            "lost_tokens",
            "duplicated_tokens",
            "ttft_p50_s",
            "ttft_p99_s",
            "itl_p50_s",
            "itl_p99_s",
            "tokens_per_s",
            "requests",
        )
        print_table(["transport", *keys], [[k, *(result[k][key] for key in keys)] for k in args.transports])
    return 0


def _one_server(loaded: LoadedModel, config: EngineConfig, args: argparse.Namespace) -> dict[str, Any]:
    limits = Limits(max_prompt_tokens=128, max_new_tokens=args.max_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with InferenceService(loaded, "bench", limits, config) as service:
            app = create_app(service, Verifier(Policy(frozenset(), frozenset())))
            with ServerThread(app, host=HOST) as server:
                references = asyncio.run(_references(server.url, args.max_tokens))
                load = asyncio.run(_load(server.url, references, args))
            stats = service.stats()
    engine = stats.engine
    return {
        **_summary(load, references, loaded),
        "preemptions": engine.preemptions,
        "kv_blocks_swapped": engine.blocks_swapped_out + engine.blocks_swapped_in,
    }


@dataclass
class _Load:
    """What the clients saw."""

    elapsed_s: float = 0.0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive text chunks
    completion_tokens: int = 0
    texts: list[tuple[int, str]] = field(default_factory=list)  # (prompt index, streamed text)


def _body(prompt: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def _references(url: str, max_tokens: int) -> list[str]:
    """Each prompt's non-streamed greedy answer (asked together: they share engine steps)."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:

        async def ask(prompt: str) -> str:
            response = await http.post("/v1/completions", json=_body(prompt, max_tokens, stream=False))
            response.raise_for_status()
            return str(response.json()["choices"][0]["text"])

        return list(await asyncio.gather(*(ask(p) for p in PROMPTS)))


async def _load(url: str, references: list[str], args: argparse.Namespace) -> _Load:
    load = _Load()
    started = time.perf_counter()
    deadline = started + args.duration
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

        async def client(index: int) -> None:
            turn = index
            while time.perf_counter() < deadline and load.requests < args.max_requests:
                load.requests += 1
                await _stream(http, turn % len(references), args.max_tokens, load)
                turn += args.clients

        await asyncio.gather(*(client(i) for i in range(args.clients)))
    load.elapsed_s = time.perf_counter() - started
    return load


async def _stream(http: httpx.AsyncClient, prompt: int, max_tokens: int, load: _Load) -> None:
    """One streamed request; its text, usage and timings go to `load`, any failure to its errors."""
    sent = time.perf_counter()
    last: float | None = None
    pieces: list[str] = []
    done = False
    try:
        body = _body(PROMPTS[prompt], max_tokens, stream=True)
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                load.errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    load.errors.append(f"error event: {event['error']}")
                    return
                if event.get("usage"):
                    load.completion_tokens += int(event["usage"]["completion_tokens"])
                for choice in event["choices"]:
                    if choice["text"]:
                        now = time.perf_counter()
                        (load.ttft_s if last is None else load.itl_s).append(
                            now - (sent if last is None else last)
                        )
                        last = now
                        pieces.append(choice["text"])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        load.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if not done:
        load.errors.append("the stream ended without [DONE]")
        return
    load.texts.append((prompt, "".join(pieces)))


def _summary(load: _Load, references: list[str], loaded: LoadedModel) -> dict[str, Any]:
    lost = duplicated = mismatched = 0
    for prompt, text in load.texts:
        if text != references[prompt]:
            mismatched += 1
            missing, extra = _token_diff(loaded, references[prompt], text)
            lost, duplicated = lost + missing, duplicated + extra
    return {
        "errors": len(load.errors),
        "lost_tokens": lost,
        "duplicated_tokens": duplicated,
        "mismatched_streams": mismatched,
        "ttft_p50_s": _percentile(load.ttft_s, 50),
        "ttft_p99_s": _percentile(load.ttft_s, 99),
        "itl_p50_s": _percentile(load.itl_s, 50),
        "itl_p99_s": _percentile(load.itl_s, 99),
        "tokens_per_s": load.completion_tokens / load.elapsed_s,
        "requests": load.requests,
        "completed": len(load.texts),
        "elapsed_s": load.elapsed_s,
        "error_samples": load.errors[:5],
    }


def _token_diff(loaded: LoadedModel, reference: str, streamed: str) -> tuple[int, int]:
    """(tokens of `reference` missing from `streamed`, tokens of `streamed` not in `reference`)."""
    want = loaded.tokenizer(reference, add_special_tokens=False)["input_ids"]
    got = loaded.tokenizer(streamed, add_special_tokens=False)["input_ids"]
    missing = extra = 0
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=want, b=got, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            missing += a1 - a0
        if op in ("insert", "replace"):
            extra += b1 - b0
    return missing, extra


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None
