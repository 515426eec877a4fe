"""`veil bench model`: decode tokens/s of veil's Llama against transformers' generate, same weights.

Both run greedy decoding of the same prompts for the same number of tokens with the same torch thread
count. Decode speed is isolated from prefill by timing N and 1 new tokens and taking the difference.

`engine_layers`: the serving engine's own decoder-layer path (`LLMEngine`, plain transport, weights
resident, the engine's compute threads beside the copy engine), timed per layer pass by its trace
recorder at `ENGINE_POINTS` (decode at several batches and contexts, prefills of several sizes, and
both with rows on one or two LoRA adapters): per distinct (pass cost, adapters), the FLOPs, bytes read
and median seconds. The simulator calibrates this machine's compute from it
(`veil.sim.calibrate.EngineCompute`).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any, NamedTuple

import torch

from veil.bench.report import emit_json, median_seconds, print_table, progress
from veil.engine.engine import EngineConfig, LLMEngine, LoraConfig
from veil.engine.weights import compute_threads_beside_device
from veil.lora import random_adapter
from veil.model.generate import GenerationRequest, generate
from veil.model.llama import Llama
from veil.model.loader import load_model
from veil.model.sampling import SamplingParams
from veil.trace import Compute, TraceRecorder

NAME = "model"
HELP = "decode tokens/s of veil's model vs transformers' generate at batch 1 and 8"

_PROMPT = "Confidential computing protects data in use by running computation inside"
LORA_RANK = 8  # the rank `veil bench lora` serves (and the simulator's validation records)


class EnginePoint(NamedTuple):
    """One engine run `engine_layers` times: `batch` prompts of `prompt_tokens`, `new_tokens` each."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    adapters: int = 0  # distinct LoRA adapters, assigned to the rows in turn (0: the base model)


# Decode passes of 1-16 rows at contexts of 16-22 and 128-134 tokens; prefill passes of 16-512
# tokens (one row of 64 or 128, or several of 16 or 64); the same on one and on two adapters.
ENGINE_POINTS = (
    EnginePoint(1, 16, 6), EnginePoint(4, 16, 6), EnginePoint(8, 16, 6), EnginePoint(16, 16, 6),
    EnginePoint(4, 64, 2), EnginePoint(1, 64, 2), EnginePoint(1, 128, 2), EnginePoint(4, 128, 6),
    EnginePoint(1, 16, 6, 1), EnginePoint(4, 16, 6, 1), EnginePoint(1, 64, 2, 1),
    EnginePoint(2, 16, 6, 2), EnginePoint(4, 16, 6, 2), EnginePoint(2, 64, 2, 2),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint directory (default: bundled)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")


def run(args: argparse.Namespace) -> int:
    from transformers import LlamaForCausalLM

    loaded = load_model(args.model)
    hf = LlamaForCausalLM.from_pretrained(str(loaded.path), dtype=torch.float32).eval()
    prompt = list(loaded.tokenizer(_PROMPT).input_ids)
    results: dict[str, dict[str, float]] = {}
    for batch in args.batch_sizes:
        progress(f"bench model: batch {batch}")
        ids = torch.tensor([prompt] * batch)

        def ours(n: int, ids: torch.Tensor = ids) -> None:
            generate(loaded.model, GenerationRequest(max_new_tokens=n, prompt_ids=ids.tolist()))

        def theirs(n: int, ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )

        veil_tps = _decode_rate(ours, batch, args.new_tokens, args.repeats)
        hf_tps = _decode_rate(theirs, batch, args.new_tokens, args.repeats)
        results[str(batch)] = {
            "veil_tokens_per_s": veil_tps,
            "transformers_tokens_per_s": hf_tps,
            "ratio": veil_tps / hf_tps,
        }
    progress("bench model: the engine's layer path")
    result = {
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "batch": results,
        "engine_layers": engine_layers(loaded.model, prompt),
    }
    if args.json:
        emit_json(result)
    else:
        rows = [
            [b, r["veil_tokens_per_s"], r["transformers_tokens_per_s"], r["ratio"]]
            for b, r in results.items()
        ]
        print_table(["batch", "veil tok/s", "transformers tok/s", "ratio"], rows)
    return 0


def _decode_rate(run_n: object, batch: int, new_tokens: int, repeats: int) -> float:
    assert callable(run_n)
    full = median_seconds(lambda: run_n(new_tokens), repeats=repeats)
    prefill = median_seconds(lambda: run_n(1), repeats=repeats)
    return batch * (new_tokens - 1) / max(full - prefill, 1e-9)


def engine_layers(
    model: Llama, prompt_ids: list[int], points: tuple[EnginePoint, ...] = ENGINE_POINTS
) -> list[dict[str, Any]]:
    """Per distinct decoder-layer pass the engine ran at `points`: FLOPs, bytes, adapters, tokens,
    median seconds and count.

    Each point is one plain engine run (weights resident: nothing crosses during the steps) of
    `batch` prompts (`prompt_ids` repeated to the point's length); its trace's layer spans (one per
    pass) are grouped by their (FLOPs, bytes, adapters).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(compute_threads_beside_device())
    spans: dict[tuple[float, float, int, int], list[float]] = {}
    try:
        for point in points:
            for e in _layer_spans(model, prompt_ids, point):
                spans.setdefault((e.flops, e.nbytes, e.adapters, e.tokens), []).append(e.seconds)
    finally:
        torch.set_num_threads(threads)
    return [
        {"flops": flops, "nbytes": nbytes, "adapters": adapters, "tokens": tokens,
         "seconds": statistics.median(seconds), "spans": len(seconds)}
        for (flops, nbytes, adapters, tokens), seconds in sorted(spans.items())
    ]  # fmt: skip


def _layer_spans(model: Llama, prompt_ids: list[int], point: EnginePoint) -> list[Compute]:
    """The layer spans of one plain engine run at `point`."""
    prompt = (prompt_ids * point.prompt_tokens)[: point.prompt_tokens]
    lora = LoraConfig(num_slots=point.adapters, max_rank=LORA_RANK) if point.adapters else None
    config = EngineConfig(
        num_device_blocks=point.batch * -(-(point.prompt_tokens + point.new_tokens) // 16),
        num_host_blocks=0,
        max_num_seqs=point.batch,
        max_num_batched_tokens=max(2048, point.batch * point.prompt_tokens),
        lora=lora,
    )
    recorder = TraceRecorder()
    with LLMEngine(model, config, recorder=recorder) as engine:
        names = [f"adapter-{i}" for i in range(point.adapters)]
        for i, name in enumerate(names):
            adapter = random_adapter(model.config, rank=LORA_RANK, alpha=2 * LORA_RANK, seed=i)
            engine.add_adapter(name, adapter)
        params = SamplingParams(max_tokens=point.new_tokens, stop_token_ids=())
        for row in range(point.batch):
            engine.add_request(prompt, params, adapter=names[row % len(names)] if names else None)
        while engine.has_unfinished():
            engine.step()
    return [
        e for s in recorder.trace.steps for e in s.events if isinstance(e, Compute) and e.label == "layer"
    ]
