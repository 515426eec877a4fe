"""`veil bench kvswap`: KV-cache swapping (vLLM's preemption) under plain, cc and pipellm, side by side.

One request set (`veil.bench.workload`, every request arriving at once) goes through the engine with
the device's KV blocks cut to fractions (`--levels`) of what the set needs at its peak, so the scheduler
preempts by swapping; every swap is one transport transfer per block. Per level: tokens/s of each
transport (generated tokens over the run, start-up excluded), preemptions, bytes swapped each way, the
pipellm predictor's hit rate over swap-ins, `gap_closure` = (pipellm - cc) / (plain - cc) (None
unless plain beats cc by more than 5%),
`pipellm_vs_cc` = pipellm / cc, `outputs_identical` across transports, the same run preempting by
recompute instead (`recompute`: nothing crosses, the preempted tokens are prefilled again;
`swap_vs_recompute_cc` > 1 says swapping wins under cc), the same cc run choosing per preemption from
the costs the engine measured (`auto`, with the share of preemptions it recomputed), and the two
per-step figures
that say whether sealing can hide at all on this machine: compute per step (plain) against sealing and
opening that step's swapped bytes at the single-core AES-GCM rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from veil.bench.report import emit_json, print_table, progress
from veil.bench.serve import drive, hit_rate, speculator_hits
from veil.bench.transfer import raw_aesgcm_gbps
from veil.bench.workload import ServeRequest, WorkloadSpec, describe, make_workload
from veil.engine.block_manager import BlockManager
from veil.engine.engine import EngineConfig, LLMEngine
from veil.engine.scheduler import PreemptionMode
from veil.engine.weights import compute_threads_beside_device
from veil.errors import UsageError
from veil.model.loader import LoadedModel, load_model
from veil.transport.base import TransportKind

NAME = "kvswap"
HELP = "KV-cache swapping tokens/s under plain, cc and pipellm at two memory-pressure levels"

KINDS = (TransportKind.PLAIN, TransportKind.CC, TransportKind.PIPELLM)
BLOCK_SIZE = 16
RECOMPUTE = "recompute"
AUTO = "auto"
MIN_GAP = 0.05  # gap_closure is reported only when plain beats cc by more than this (else it is noise)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=16, help="requests in the set (default 16)")
    parser.add_argument("--mean-output", type=int, default=32, help="mean output tokens (exponential)")
    parser.add_argument("--max-output", type=int, default=96, help="output tokens at most")
    parser.add_argument(
        "--levels", type=float, nargs="+", default=[0.3, 0.15],
        help="device KV blocks as fractions of the blocks all requests hold at their ends (default 0.3 0.15)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/bench-kvswap", help="directory for result.json and the plot")


def run(args: argparse.Namespace) -> int:
    if not all(0 < level <= 1 for level in args.levels):
        raise UsageError(f"--levels must be fractions in (0, 1], got {args.levels}")
    torch.set_num_threads(compute_threads_beside_device())
    loaded = load_model(progress=False)
    spec = WorkloadSpec(args.requests, 0.0, 2, args.mean_output, args.max_output, args.seed)
    requests = make_workload(loaded.tokenizer, spec)
    raw_gbps = raw_aesgcm_gbps()
    levels = [_level(loaded, requests, fraction, raw_gbps) for fraction in args.levels]
    result = {
        "workload": describe(requests),
        "raw_aesgcm_gbps": raw_gbps,
        "cpus": os.cpu_count(),
        "levels": levels,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    _plot(levels, out_dir / "kvswap.png")
    if args.json:
        emit_json(result)
    else:
        keys = (
            "device_blocks",
            "plain",
            "cc",
            "pipellm",
            RECOMPUTE,
            AUTO,
            "gap_closure",
            "pipellm_vs_cc",
            "preemptions",
        )
        print_table(["level", *keys], [[lv["fraction"], *(lv[k] for k in keys)] for lv in levels])
        print(f"\nwrote {out_dir / 'result.json'} and {out_dir / 'kvswap.png'}")
    return 0


def _level(
    loaded: LoadedModel, requests: list[ServeRequest], fraction: float, raw_gbps: float
) -> dict[str, Any]:
    blocks = _device_blocks(requests, fraction)
    details, outputs = {}, []
    for kind in KINDS:
        progress(f"bench kvswap: {fraction} of peak ({blocks} blocks), {kind.value}")
        config = EngineConfig(
            transport=kind, block_size=BLOCK_SIZE, num_device_blocks=blocks, num_host_blocks=4 * blocks
        )
        details[kind.value], out = _measure(loaded, requests, config)
        outputs.append(out)
    progress(f"bench kvswap: {fraction} of peak ({blocks} blocks), recompute")
    recompute = EngineConfig(
        transport=TransportKind.CC,
        block_size=BLOCK_SIZE,
        num_device_blocks=blocks,
        preemption_mode=PreemptionMode.RECOMPUTE,
    )
    details[RECOMPUTE], out = _measure(loaded, requests, recompute)
    outputs.append(out)
    progress(f"bench kvswap: {fraction} of peak ({blocks} blocks), cc choosing from measured costs")
    auto = EngineConfig(
        transport=TransportKind.CC,
        block_size=BLOCK_SIZE,
        num_device_blocks=blocks,
        num_host_blocks=4 * blocks,
        preemption_mode=PreemptionMode.AUTO,
    )
    details[AUTO], out = _measure(loaded, requests, auto)
    outputs.append(out)
    plain, cc, pipellm = (details[k.value]["tokens_per_s"] for k in KINDS)
    base = details[TransportKind.PLAIN.value]
    swapped_per_step = (base["bytes_swapped_out"] + base["bytes_swapped_in"]) / base["steps"]
    seal_and_open_s = 2 * swapped_per_step / (raw_gbps * 1e9)  # each byte is sealed once and opened once
    return {
        "fraction": fraction,
        "device_blocks": blocks,
        "plain": plain,
        "cc": cc,
        "pipellm": pipellm,
        "gap_closure": (pipellm - cc) / (plain - cc) if plain > (1 + MIN_GAP) * cc else None,
        "pipellm_vs_cc": pipellm / cc,
        "recompute": details[RECOMPUTE]["tokens_per_s"],  # preempting by recompute: no KV crosses
        "swap_vs_recompute_cc": cc / details[RECOMPUTE]["tokens_per_s"],  # > 1: swapping wins under cc
        "auto": details[AUTO]["tokens_per_s"],  # cc, each preemption by whichever measured cost is lower
        "auto_recompute_share": details[AUTO]["recompute_share"],
        "outputs_identical": all(out == outputs[0] for out in outputs),
        "preemptions": base["preemptions"],
        "bytes_swapped_out": base["bytes_swapped_out"],
        "bytes_swapped_in": base["bytes_swapped_in"],
        "predictor_hit_rate": details[TransportKind.PIPELLM.value]["predictor_hit_rate"],
        "compute_s_per_step": base["s_per_step"],
        "seal_and_open_s_per_step": seal_and_open_s,
        "compute_exceeds_sealing": base["s_per_step"] > seal_and_open_s,
        "details": details,
    }


def _device_blocks(requests: list[ServeRequest], fraction: float) -> int:
    """`fraction` of the blocks all requests hold at their ends, at least what the longest one needs."""
    bm = BlockManager(num_device_blocks=0, num_host_blocks=0, block_size=BLOCK_SIZE)
    needs = [bm.blocks_for(len(r.prompt_token_ids) + r.output_tokens - 1) for r in requests]
    return max(round(fraction * sum(needs)), max(needs))


def _measure(
    loaded: LoadedModel, requests: list[ServeRequest], config: EngineConfig
) -> tuple[dict[str, Any], list]:
    with LLMEngine(loaded.model, config) as engine:
        before = speculator_hits(engine)
        start = time.perf_counter()
        outputs, _ = drive(engine, requests)
        elapsed = time.perf_counter() - start
        after = speculator_hits(engine)
    s = engine.stats
    measured: dict[str, Any] = {
        "tokens_per_s": s.generated_tokens / elapsed,
        "steps": s.steps,
        "s_per_step": elapsed / s.steps,
        "preemptions": s.preemptions,
        "recompute_share": s.preempted_by_recompute / s.preemptions if s.preemptions else None,
        "swap_s_per_block": engine.costs.swap_s_per_block,
        "prefill_s_per_token": engine.costs.prefill_s_per_token,
        "bytes_swapped_out": s.bytes_swapped_out,
        "bytes_swapped_in": s.bytes_swapped_in,
    }
    measured["predictor_hit_rate"] = hit_rate(before, after)
    return measured, outputs


def _plot(levels: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.16
    for i, label in enumerate([*(kind.value for kind in KINDS), RECOMPUTE, AUTO]):
        xs = [j + (i - 2) * width for j in range(len(levels))]
        ax.bar(xs, [lv[label] for lv in levels], width, label=label)
    ax.set_xticks(
        range(len(levels)),
        [f"{lv['fraction']:.0%} of peak KV\n({lv['device_blocks']} blocks)" for lv in levels],
    )
    ax.set_ylabel("tokens/s")
    ax.set_title("KV-cache swapping through the transport")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
