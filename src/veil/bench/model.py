"""`veil bench model`: decode tokens/s of veil's Llama against transformers' generate, same weights.

Both run greedy decoding of the same prompts for the same number of tokens with the same torch thread
count. Decode speed is isolated from prefill by timing N and 1 new tokens and taking the difference.
"""

from __future__ import annotations

import argparse
import os

import torch

from veil.bench.report import emit_json, median_seconds, print_table, progress
from veil.model.generate import GenerationRequest, generate
from veil.model.loader import load_model

NAME = "model"
HELP = "decode tokens/s of veil's model vs transformers' generate at batch 1 and 8"

_PROMPT = "Confidential computing protects data in use by running computation inside"


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
    result = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "batch": results}
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
