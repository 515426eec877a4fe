"""`veil bench model`: decode tokens/s of veil's Llama against transformers' generate, same weights.

Both run greedy decoding of the same prompts for the same number of tokens with the same torch thread
count. Decode speed is isolated from prefill by timing N and 1 new tokens and taking the difference.

`engine_layers`: the serving engine's own decoder-layer path (`LLMEngine`, plain transport, weights
resident, the engine's compute threads beside the copy engine), timed per layer by its trace recorder
at `ENGINE_POINTS` (decode at several batches, prefill of several sizes): per distinct layer cost, the
FLOPs, bytes read and median seconds. The simulator calibrates this machine's compute from it
(`veil.sim.calibrate.EngineCompute`).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import torch

from veil.bench.report import emit_json, median_seconds, print_table, progress
from veil.engine.engine import EngineConfig, LLMEngine
from veil.engine.weights import compute_threads_beside_device
from veil.model.generate import GenerationRequest, generate
from veil.model.llama import Llama
from veil.model.loader import load_model
from veil.model.sampling import SamplingParams
from veil.trace import Compute, TraceRecorder

NAME = "model"
HELP = "decode tokens/s of veil's model vs transformers' generate at batch 1 and 8"

_PROMPT = "Confidential computing protects data in use by running computation inside"
# (batch, prompt tokens, new tokens) the engine's layer path is timed at: decode batches 1-16, and
# prefills of 16-256 tokens per layer pass.
ENGINE_POINTS = ((1, 16, 6), (4, 16, 6), (8, 16, 6), (16, 16, 6), (4, 64, 2))


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
    model: Llama, prompt_ids: list[int], points: tuple[tuple[int, int, int], ...] = ENGINE_POINTS
) -> list[dict[str, Any]]:
    """Per distinct decoder-layer cost the engine ran at `points`: FLOPs, bytes, median seconds, count.

    Each point is one plain engine run (weights resident: nothing crosses during the steps) of `batch`
    prompts (`prompt_ids` repeated to the point's length); its trace's layer spans are grouped by
    their (FLOPs, bytes).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(compute_threads_beside_device())
    spans: dict[tuple[float, float], list[float]] = {}
    try:
        for batch, prompt_tokens, new_tokens in points:
            prompt = (prompt_ids * prompt_tokens)[:prompt_tokens]
            config = EngineConfig(
                num_device_blocks=batch * -(-(prompt_tokens + new_tokens) // 16),
                num_host_blocks=0,
                max_num_seqs=batch,
                max_num_batched_tokens=max(2048, batch * prompt_tokens),
            )
            recorder = TraceRecorder()
            with LLMEngine(model, config, recorder=recorder) as engine:
                params = SamplingParams(max_tokens=new_tokens, stop_token_ids=())
                for _ in range(batch):
                    engine.add_request(prompt, params)
                while engine.has_unfinished():
                    engine.step()
            for step in recorder.trace.steps:
                for e in step.events:
                    if isinstance(e, Compute) and e.label == "layer":
                        spans.setdefault((e.flops, e.nbytes), []).append(e.seconds)
    finally:
        torch.set_num_threads(threads)
    return [
        {"flops": flops, "nbytes": nbytes, "seconds": statistics.median(seconds), "spans": len(seconds)}
        for (flops, nbytes), seconds in sorted(spans.items())
    ]
