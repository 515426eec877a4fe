"""`veil bench sim`: FlexGen weight offloading on modelled H100 hardware, plain vs cc vs pipellm.

Unlike the other benchmarks this one measures nothing on this machine: it drives the real PipeLLM
speculator and predictors on the simulator's virtual clock (veil.sim), with a hardware profile where
the GPU's copy engine decrypts in hardware and spare CPU cores seal ahead. Beside each row it prints
the paper's measured CC throughput drops and its claim that PipeLLM costs < 19.6% against non-CC.
Figures are tokens/s of decode. See docs/sim.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from veil.bench.report import emit_json, print_table, progress
from veil.errors import UsageError
from veil.sim import H100_SXM_PCIE5, MODELS, Comparison, Scenario, compare
from veil.sim.paper import PAPER_CC_DROP as PAPER_CC_DROP_BY_WORKLOAD
from veil.sim.paper import PAPER_PIPELLM_OVERHEAD_BELOW

NAME = "sim"
HELP = "simulated FlexGen offloading on an H100 profile: plain vs cc vs pipellm tokens/s"

# PipeLLM (ASPLOS 2025): measured FlexGen throughput drop with CC on, and PipeLLM's bound vs non-CC.
PAPER_CC_DROP = {
    model: drop for (workload, model), drop in PAPER_CC_DROP_BY_WORKLOAD.items() if workload == "offload"
}
PAPER_PIPELLM_COST_BELOW = PAPER_PIPELLM_OVERHEAD_BELOW
DEFAULT_MODELS = ("opt-13b", "opt-30b", "opt-66b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this benchmark's options."""
    defaults = Scenario(MODELS["opt-13b"], H100_SXM_PCIE5, batch=1)
    parser.add_argument(
        "--model",
        action="append",
        choices=sorted(MODELS),
        help=f"model profile (repeatable; default {', '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[64, 256], help="batch sizes (default 64 256)"
    )
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help=f"measured passes (default {defaults.steps})"
    )
    parser.add_argument(
        "--spare-cores",
        type=int,
        nargs="+",
        default=[H100_SXM_PCIE5.spare_cores],
        help=f"cores sealing ahead for pipellm (default {H100_SXM_PCIE5.spare_cores})",
    )
    parser.add_argument("--vaes", action="store_true", help="seal at the VAES rate instead of AES-NI")
    parser.add_argument(
        "--offload-fraction", type=float, default=1.0, help="share of each layer streamed (default 1)"
    )
    parser.add_argument(
        "--context", type=int, default=defaults.context_tokens, help="KV tokens per sequence (default 512)"
    )
    parser.add_argument("--depth", type=int, default=defaults.depth, help="pipellm reservations ahead")
    parser.add_argument(
        "--max-requests",
        type=int,
        default=defaults.max_requests,
        help=f"chunk requests per run; bounds the layers streamed (default {defaults.max_requests})",
    )


def run(args: argparse.Namespace) -> int:
    """Simulate and print; returns the exit status."""
    if min(*args.batch, args.steps, args.depth, args.max_requests) < 1 or min(args.spare_cores) < 0:
        raise UsageError("--batch, --steps, --depth, --max-requests must be >= 1; --spare-cores >= 0")
    if not 0 < args.offload_fraction <= 1:
        raise UsageError("--offload-fraction must be in (0, 1]")
    hardware = dataclasses.replace(H100_SXM_PCIE5, vaes=args.vaes)
    rows: list[dict[str, Any]] = []
    for name in args.model or DEFAULT_MODELS:
        for batch in args.batch:
            for cores in args.spare_cores:
                progress(f"bench sim: {name} batch {batch}, {cores} spare cores")
                scenario = Scenario(
                    MODELS[name],
                    dataclasses.replace(hardware, spare_cores=cores),
                    batch,
                    context_tokens=args.context,
                    steps=args.steps,
                    offload_fraction=args.offload_fraction,
                    depth=args.depth,
                    max_requests=args.max_requests,
                )
                start = time.perf_counter()
                comparison = compare(scenario)
                rows.append(_row(name, batch, cores, comparison, time.perf_counter() - start))
    result = {
        "hardware": dataclasses.asdict(hardware),
        "paper": {"cc_drop": PAPER_CC_DROP, "pipellm_cost_below": PAPER_PIPELLM_COST_BELOW},
        "rows": rows,
    }
    if args.json:
        emit_json(result)
    else:
        _print(result)
    return 0


def _row(name: str, batch: int, cores: int, c: Comparison, wall_s: float) -> dict[str, Any]:
    stats = c.pipellm.stats
    assert stats is not None
    return {
        "model": name,
        "batch": batch,
        "spare_cores": cores,
        "plain_tokens_per_s": round(c.plain.tokens_per_s, 2),
        "cc_tokens_per_s": round(c.cc.tokens_per_s, 2),
        "pipellm_tokens_per_s": round(c.pipellm.tokens_per_s, 2),
        "cc_drop": round(c.cc_drop, 3),
        "paper_cc_drop": PAPER_CC_DROP.get(name),
        "pipellm_cost": round(c.pipellm_cost, 3),
        "gap_closure": None if c.gap_closure is None else round(c.gap_closure, 3),
        "layer_compute_ms": round(c.layout.compute_s * 1e3, 3),
        "chunks_per_layer": len(c.layout.chunk_lengths),
        "layers_streamed": c.layout.layers_in_cycle,
        "speculator": dataclasses.asdict(stats),
        "wait_s": round(c.pipellm.wait_s, 6),
        "wall_s": round(wall_s, 2),
    }


def _print(result: dict[str, Any]) -> None:
    hw = result["hardware"]
    seal = hw["aes_gcm_vaes_bytes_per_s"] if hw["vaes"] else hw["aes_gcm_bytes_per_s"]
    print(
        f"{hw['name']}: PCIe {hw['pcie_h2d_bytes_per_s'] / 1e9:.0f} GB/s, "
        f"AES-GCM {seal / 1e9:.1f} GB/s per core{' (VAES)' if hw['vaes'] else ''}"
    )
    headers = ["model", "batch", "cores", "plain tok/s", "cc tok/s", "pipellm tok/s", "cc drop"]
    headers += ["paper cc drop", "pipellm cost", "gap closure", "hits", "layers", "wall s"]
    rows = [
        [
            r["model"],
            r["batch"],
            r["spare_cores"],
            r["plain_tokens_per_s"],
            r["cc_tokens_per_s"],
            r["pipellm_tokens_per_s"],
            _pct(r["cc_drop"]),
            _pct(r["paper_cc_drop"]),
            _pct(r["pipellm_cost"]),
            r["gap_closure"] if r["gap_closure"] is not None else "-",
            f"{r['speculator']['hits']}/{r['speculator']['requests']}",
            f"{r['layers_streamed']} x {r['chunks_per_layer']}",
            r["wall_s"],
        ]
        for r in result["rows"]
    ]
    print_table(headers, rows)
    paper = result["paper"]["pipellm_cost_below"]
    print(f"\npaper: PipeLLM costs < {paper:.1%} throughput vs non-CC (FlexGen, vLLM, PEFT; 13B-175B)")
    print("pipellm cost = 1 - pipellm / plain; hits counted over all passes (warm-up misses included)")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{round(value, 3) + 0.0:.1%}"  # no "-0.0%" from float noise
