"""`veil bench lora`: multi-LoRA serving with adapter swapping under plain, cc and pipellm, side by side.

PipeLLM's third workload (S-LoRA / PEFT serving): many adapters in host memory, a few device slots,
an adapter loaded through the transport when a request needs it and its slot is not resident. One
request set (`veil.bench.workload`, every request arriving at once), each request with an adapter
drawn from a popularity mix over `--adapters` seeded random adapters (rank `--rank`, all seven
targets), goes through the engine with `--slots` slots on each transport in one process:

- with `--repeats N`, N interleaved rounds over the transports, each transport's best round counting;
- `plain`, `cc`, `pipellm` (the engine names the adapters its queue needs: the queue is PipeLLM's
  predictor for adapter loads) and `pipellm_nohints` (the transparent predictors alone, for
  comparison), in tokens/s (generated tokens over the run, start-up excluded);
- adapter loads, the pipellm speculator's hit rate over the run, `gap_closure` =
  (pipellm - cc) / (plain - cc) (None unless plain beats cc by more than 5%), `pipellm_vs_cc`,
  `outputs_identical` across transports;
- the per-step figures that say whether sealing can hide at all on this machine: compute per step
  (plain) against sealing the step's adapter loads at the single-core AES-GCM rate measured in the
  same run.

Mixes: `zipf` (popularity ~ 1 / rank^1.1, the skew S-LoRA's traces show) and `uniform`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.bench.report import emit_json, print_table, progress
from veil.bench.serve import drive, hit_rate, speculator_hits
from veil.bench.transfer import raw_aesgcm_gbps
from veil.bench.workload import ServeRequest, WorkloadSpec, describe, make_workload
from veil.engine.engine import EngineConfig, LLMEngine, LoraConfig
from veil.engine.weights import compute_threads_beside_device
from veil.errors import UsageError
from veil.lora import Adapter, random_adapter
from veil.model.loader import LoadedModel, load_model
from veil.transport.base import TransportKind

NAME = "lora"
HELP = "multi-LoRA adapter swapping tokens/s under plain, cc and pipellm (Zipf and uniform mixes)"

NOHINTS = "pipellm_nohints"
RUNS = (
    ("plain", TransportKind.PLAIN, True),
    ("cc", TransportKind.CC, True),
    ("pipellm", TransportKind.PIPELLM, True),
    (NOHINTS, TransportKind.PIPELLM, False),
)
MIXES = ("zipf", "uniform")
ZIPF_S = 1.1
MIN_GAP = 0.05  # gap_closure is reported only when plain beats cc by more than this (else it is noise)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", type=int, default=32, help="adapters in host memory (default 32)")
    parser.add_argument("--slots", type=int, default=4, help="adapter slots on the device (default 4)")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank (default 8)")
    parser.add_argument("--requests", type=int, default=48, help="requests per mix (default 48)")
    parser.add_argument("--mean-output", type=int, default=16, help="mean output tokens (exponential)")
    parser.add_argument("--max-output", type=int, default=48, help="output tokens at most")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="requests running at once (default 8)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="interleaved rounds over the transports; each one's best round counts (the machine is "
        "shared, and interference only ever slows a round down)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/bench-lora", help="directory for result.json and the plot")


def run(args: argparse.Namespace) -> int:
    if min(args.adapters, args.slots, args.rank, args.requests, args.max_num_seqs, args.repeats) < 1:
        raise UsageError("--adapters, --slots, --rank, --requests, --max-num-seqs and --repeats must be >= 1")
    torch.set_num_threads(compute_threads_beside_device())
    loaded = load_model(progress=False)
    progress(f"bench lora: {args.adapters} random adapters of rank {args.rank}")
    adapters = {
        f"adapter-{i:02d}": random_adapter(loaded.config, rank=args.rank, alpha=2 * args.rank, seed=i)
        for i in range(args.adapters)
    }
    spec = WorkloadSpec(args.requests, 0.0, 2, args.mean_output, args.max_output, args.seed)
    base = make_workload(loaded.tokenizer, spec)
    raw_gbps = raw_aesgcm_gbps()
    mixes = []
    for mix in MIXES:
        requests = assign_adapters(base, list(adapters), mix, np.random.default_rng(args.seed))
        mixes.append(_mix(loaded, adapters, requests, mix, args, raw_gbps))
    result = {
        "workload": describe(base),
        "adapters": args.adapters,
        "slots": args.slots,
        "rank": args.rank,
        "raw_aesgcm_gbps": raw_gbps,
        "cpus": os.cpu_count(),
        "mixes": mixes,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    _plot(mixes, out_dir / "lora.png")
    if args.json:
        emit_json(result)
    else:
        keys = (
            "plain", "cc", "pipellm", NOHINTS, "gap_closure", "pipellm_vs_cc", "adapter_loads", "hit_rate"
        )  # fmt: skip
        print_table(["mix", *keys], [[m["mix"], *(m[k] for k in keys)] for m in mixes])
        print(f"\nwrote {out_dir / 'result.json'} and {out_dir / 'lora.png'}")
    return 0


def assign_adapters(
    requests: list[ServeRequest], names: list[str], mix: str, rng: np.random.Generator
) -> list[ServeRequest]:
    """Each request with an adapter drawn from `mix`: `zipf` (p ~ 1 / rank^1.1) or `uniform`."""
    if mix == "zipf":
        weights = 1.0 / np.arange(1, len(names) + 1) ** ZIPF_S
    elif mix == "uniform":
        weights = np.ones(len(names))
    else:
        raise ValueError(f"unknown mix {mix!r}; use one of {MIXES}")
    picks = rng.choice(len(names), size=len(requests), p=weights / weights.sum())
    return [replace(r, adapter=names[i]) for r, i in zip(requests, picks, strict=True)]


def _mix(
    loaded: LoadedModel,
    adapters: dict[str, Adapter],
    requests: list[ServeRequest],
    mix: str,
    args: argparse.Namespace,
    raw_gbps: float,
) -> dict[str, Any]:
    details: dict[str, dict[str, Any]] = {}
    outputs: list[list[list[int]]] = []
    longest = max(len(r.prompt_token_ids) + r.output_tokens for r in requests)
    for round_ in range(args.repeats):  # interleaved rounds; each transport's best round counts
        for label, kind, hints in RUNS:
            progress(f"bench lora: {mix} mix, {label}, round {round_ + 1} of {args.repeats}")
            config = EngineConfig(
                transport=kind,
                num_device_blocks=args.max_num_seqs * -(-longest // 16),  # KV never runs out: adapters do
                num_host_blocks=0,
                max_num_seqs=args.max_num_seqs,
                lora=LoraConfig(num_slots=args.slots, max_rank=args.rank, hint_transport=hints),
            )
            measured, out = _measure(loaded, adapters, requests, config)
            outputs.append(out)
            if measured["tokens_per_s"] > details.get(label, {}).get("tokens_per_s", 0.0):
                details[label] = measured
    plain, cc, pipellm = (details[k]["tokens_per_s"] for k in ("plain", "cc", "pipellm"))
    base = details["plain"]
    seal_s = base["adapter_bytes"] / base["steps"] / (raw_gbps * 1e9)
    return {
        "mix": mix,
        "plain": plain,
        "cc": cc,
        "pipellm": pipellm,
        NOHINTS: details[NOHINTS]["tokens_per_s"],
        "gap_closure": (pipellm - cc) / (plain - cc) if plain > (1 + MIN_GAP) * cc else None,
        "gap_closure_nohints": (details[NOHINTS]["tokens_per_s"] - cc) / (plain - cc)
        if plain > (1 + MIN_GAP) * cc
        else None,
        "pipellm_vs_cc": pipellm / cc,
        "outputs_identical": all(out == outputs[0] for out in outputs),
        "adapter_loads": base["adapter_loads"],
        "hit_rate": details["pipellm"]["hit_rate"],
        "hit_rate_nohints": details[NOHINTS]["hit_rate"],
        "compute_s_per_step": base["s_per_step"],
        "seal_s_per_step": seal_s,
        "compute_exceeds_sealing": base["s_per_step"] > seal_s,
        "details": details,
    }


def _measure(
    loaded: LoadedModel, adapters: dict[str, Adapter], requests: list[ServeRequest], config: EngineConfig
) -> tuple[dict[str, Any], list[list[int]]]:
    with LLMEngine(loaded.model, config) as engine:
        for name, adapter in adapters.items():
            engine.add_adapter(name, adapter)
        before = speculator_hits(engine)
        start = time.perf_counter()
        outputs, _ = drive(engine, requests)
        elapsed = time.perf_counter() - start
        after = speculator_hits(engine)
        bank = engine.runner.adapters
        assert bank is not None
        slot_bytes = bank.slot_bytes
    s = engine.stats
    measured: dict[str, Any] = {
        "tokens_per_s": s.generated_tokens / elapsed,
        "steps": s.steps,
        "s_per_step": elapsed / s.steps,
        "adapter_loads": s.adapter_loads,
        "adapter_bytes": s.adapter_loads * slot_bytes,
        "hit_rate": hit_rate(before, after),
    }
    return measured, outputs


def _plot(mixes: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [label for label, _, _ in RUNS]
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(mixes))]
        ax.bar(xs, [m[label] for m in mixes], width, label=label)
    ax.set_xticks(range(len(mixes)), [m["mix"] for m in mixes])
    ax.set_ylabel("tokens/s")
    ax.set_title("Multi-LoRA serving: adapter loads through the transport")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
