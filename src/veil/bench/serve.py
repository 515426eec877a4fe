"""`veil bench serve`: one request set through the engine, one request at a time, and transformers.

(a) `engine`: `LLMEngine` with continuous batching over its paged KV cache on the emulated device;
(b) `serial`: each request alone through `veil.model.generate` (what `veil serve` did before the engine);
(c) `transformers`: `LlamaForCausalLM.generate` over static, left-padded batches of `--batch-size`
    requests in arrival order (a batch starts when its last request has arrived and the previous batch
    is done, and decodes until its longest request is).
All three see the same requests arriving on the same clock (see `veil.bench.workload`) and generate
exactly each request's drawn length, greedily; tokens/s counts those tokens only. Latency is finish
time minus arrival time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.bench.report import emit_json, print_table, progress
from veil.bench.workload import ServeRequest, WorkloadSpec, describe, make_workload
from veil.engine.engine import EngineConfig, LLMEngine
from veil.engine.weights import compute_threads_beside_device
from veil.errors import UsageError
from veil.model.generate import GenerationRequest, generate
from veil.model.loader import LoadedModel, load_model
from veil.model.sampling import SamplingParams
from veil.transport.base import TransportKind

NAME = "serve"
HELP = "tokens/s and latency: the engine vs one request at a time vs transformers' static batches"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=32, help="requests in the set (default 32)")
    parser.add_argument(
        "--rate", type=float, default=8.0, help="Poisson arrivals per second (0: all at once)"
    )
    parser.add_argument("--max-sentences", type=int, default=2, help="review sentences per prompt, at most")
    parser.add_argument("--mean-output", type=int, default=32, help="mean output tokens (exponential)")
    parser.add_argument("--max-output", type=int, default=128, help="output tokens at most")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="transformers' static batch and max_num_seqs"
    )
    parser.add_argument("--transport", choices=[k.value for k in TransportKind], default="plain")
    parser.add_argument("--skip", nargs="*", default=[], choices=["serial", "transformers"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/bench-serve", help="directory for result.json")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    spec = WorkloadSpec(
        args.requests, args.rate, args.max_sentences, args.mean_output, args.max_output, args.seed
    )
    torch.set_num_threads(compute_threads_beside_device())
    loaded = load_model(progress=False)
    requests = make_workload(loaded.tokenizer, spec)
    result: dict[str, Any] = {
        "workload": describe(requests),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    progress("bench serve: engine")
    config = EngineConfig(transport=TransportKind(args.transport), max_num_seqs=args.batch_size)
    result["engine"], engine_out = _serve_engine(loaded, requests, config)
    if "serial" not in args.skip:
        progress("bench serve: serial")
        result["serial"], serial_out = _serve_serial(loaded, requests)
        result["outputs_identical"] = serial_out == engine_out
        result["engine_vs_serial"] = result["engine"]["tokens_per_s"] / result["serial"]["tokens_per_s"]
    if "transformers" not in args.skip:
        progress("bench serve: transformers")
        result["transformers"] = _serve_transformers(loaded, requests, args.batch_size)
        result["engine_vs_transformers"] = (
            result["engine"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
        )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    if args.json:
        emit_json(result)
    else:
        systems = [s for s in ("engine", "serial", "transformers") if s in result]
        rows = [
            [s, *(result[s][k] for k in ("tokens_per_s", "requests_per_s", "p50_s", "p99_s"))]
            for s in systems
        ]
        print_table(["system", "tokens/s", "requests/s", "p50 s", "p99 s"], rows)
    return 0


def summarize(requests: list[ServeRequest], finish_s: list[float], elapsed_s: float) -> dict[str, float]:
    latencies = [end - r.arrival_s for r, end in zip(requests, finish_s, strict=True)]
    tokens = sum(r.output_tokens for r in requests)
    return {
        "tokens_per_s": tokens / elapsed_s,
        "requests_per_s": len(requests) / elapsed_s,
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "elapsed_s": elapsed_s,
    }


def _serve_engine(
    loaded: LoadedModel, requests: list[ServeRequest], config: EngineConfig
) -> tuple[dict[str, float], list[list[int]]]:
    with LLMEngine(loaded.model, config) as engine:
        outputs, finish = drive(engine, requests)
    return summarize(requests, finish, max(finish)), outputs


def drive(engine: LLMEngine, requests: list[ServeRequest]) -> tuple[list[list[int]], list[float]]:
    """Feed requests as they arrive and step until all are done; outputs and finish times, in order."""
    index_of: dict[int, int] = {}
    outputs: list[list[int]] = [[] for _ in requests]
    finish = [0.0] * len(requests)
    start, admitted = time.perf_counter(), 0
    while admitted < len(requests) or engine.has_unfinished():
        now = time.perf_counter() - start
        while admitted < len(requests) and requests[admitted].arrival_s <= now:
            r = requests[admitted]
            params = SamplingParams(max_tokens=r.output_tokens, stop_token_ids=())
            index_of[engine.add_request(r.prompt_token_ids, params, adapter=r.adapter)] = admitted
            admitted += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, requests[admitted].arrival_s - now))
            continue
        for out in engine.step():
            outputs[index_of[out.request_id]] += out.new_token_ids
            if out.finished:
                finish[index_of[out.request_id]] = time.perf_counter() - start
    return outputs, finish


def speculator_hits(engine: LLMEngine) -> tuple[int, int] | None:
    """(hits, requests) of the pipellm speculator so far; None for transports that do not speculate."""
    stats = engine.runner.transport.stats().pipellm
    if stats is None:
        return None
    return stats.speculator.hits, stats.speculator.requests


def hit_rate(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The speculator's hit rate between two `speculator_hits` snapshots (None: nothing to rate)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _serve_serial(
    loaded: LoadedModel, requests: list[ServeRequest]
) -> tuple[dict[str, float], list[list[int]]]:
    outputs: list[list[int]] = []

    def one(batch: list[ServeRequest]) -> None:
        (r,) = batch
        request = GenerationRequest(max_new_tokens=r.output_tokens, prompt_ids=[r.prompt_token_ids])
        outputs.append(generate(loaded.model, request)[0])

    finish = _in_batches(requests, 1, one)
    return summarize(requests, finish, max(finish)), outputs


def _serve_transformers(
    loaded: LoadedModel, requests: list[ServeRequest], batch_size: int
) -> dict[str, float]:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(loaded.path), dtype=torch.float32).eval()

    def batched(batch: list[ServeRequest]) -> None:
        longest = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, longest - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            mask[row, longest - len(r.prompt_token_ids) :] = 1
        new = max(r.output_tokens for r in batch)
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

    finish = _in_batches(requests, batch_size, batched)
    return summarize(requests, finish, max(finish))


def _in_batches(
    requests: list[ServeRequest], batch_size: int, run_batch: Callable[[list[ServeRequest]], None]
) -> list[float]:
    """Run consecutive batches in arrival order, each once its last request has arrived; finish times."""
    finish: list[float] = []
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        time.sleep(max(0.0, batch[-1].arrival_s - (time.perf_counter() - start)))
        run_batch(batch)
        finish += [time.perf_counter() - start] * len(batch)
    return finish
