"""`veil bench offload`: FlexGen-style weight streaming under plain, cc and pipellm, side by side.

For each point (host dtype x workload) the same prompts are generated greedily, batched by the serving
engine with every decoder layer streamed from host memory (`StreamedWeights`), over each transport in
one process (tokens/s counts generated tokens, and for the prefill point the prompt tokens as well);
the table reports tokens/s, the gap closure (pipellm - cc) / (plain - cc), whether all outputs were
identical, and the per-layer figures that say whether this 2-core machine can hide sealing at that
point at all: a layer's compute time against its sealing time (at the raw single-core AES-GCM speed
measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from veil.bench.report import emit_json, median_interval, print_table, progress
from veil.bench.transfer import CoreRates, core_rates
from veil.engine.engine import EngineConfig, LLMEngine
from veil.engine.offload_policy import HostDtype, OffloadPolicy
from veil.engine.weights import compute_threads_beside_device
from veil.errors import UsageError
from veil.model.llama import LayerWeights
from veil.model.loader import LoadedModel, load_model
from veil.model.sampling import SamplingParams
from veil.transport.base import TransportKind

NAME = "offload"
HELP = "weight offloading tokens/s under plain, cc and pipellm at several batch sizes"

MODES = (TransportKind.PLAIN, TransportKind.CC, TransportKind.PIPELLM)
HINTED = "pipellm_hinted"  # pipellm told the layer order by the engine (for comparison)
_TEXT = (
    "Confidential computing protects data in use. Every transfer between the processor and the "
    "accelerator is encrypted and authenticated, which costs time on the critical path unless it is "
    "hidden behind computation. "
)


@dataclass(frozen=True)
class Point:
    """One workload: a batch of prompts of `prompt_tokens`, generating `new_tokens` each."""

    name: str
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    counts_prompt: bool = False  # tokens/s counts prompt tokens too (prefill-heavy points)

    @property
    def tokens(self) -> int:
        """Tokens the point's throughput counts."""
        return self.batch_size * (self.new_tokens + (self.prompt_tokens if self.counts_prompt else 0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps per point (default 16)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of decode points")
    parser.add_argument("--prefill-tokens", type=int, default=256, help="prompt length of the prefill point")
    parser.add_argument(
        "--host-dtypes", nargs="+", default=["fp32", "bf16"], choices=[d.value for d in HostDtype]
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=6,
        help="interleaved rounds over the transports (every other one reversed), whose engines live "
        "through all rounds; each one's best round counts (the machine is shared, and interference "
        "only ever slows a round down), and pipellm / cc is also reported per round, with a 95%% "
        "interval for its median from 6 rounds on (default 6)",
    )
    parser.add_argument("--out", default="out/bench-offload", help="directory for result.json and the plot")
    parser.add_argument(
        "--compute-threads",
        type=int,
        default=compute_threads_beside_device(),
        help="torch threads for layer compute in every mode (default: all cores but one, which the "
        "emulated copy engine needs)",
    )


def run(args: argparse.Namespace) -> int:
    if min(args.compute_threads, args.new_tokens, args.repeats, *args.batch_sizes) < 1:
        raise UsageError("--compute-threads, --new-tokens, --repeats and --batch-sizes must be >= 1")
    torch.set_num_threads(args.compute_threads)
    loaded = load_model()
    points = [Point(f"decode-b{b}", b, args.prompt_tokens, args.new_tokens) for b in args.batch_sizes]
    points.append(Point("prefill-b4", 4, args.prefill_tokens, 2, counts_prompt=True))
    rates = core_rates()
    layer_numel = LayerWeights.numel(loaded.config)
    results: list[dict[str, Any]] = []
    for dtype in (HostDtype(d) for d in args.host_dtypes):
        for point in points:
            progress(f"bench offload: {dtype.value} {point.name}")
            results.append(_measure(loaded, dtype, point, rates, layer_numel, args.repeats))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "raw_aesgcm_gbps": rates.seal,
        "core_rates_gbps": asdict(rates),
        "cpus": os.cpu_count(),
        "compute_threads": args.compute_threads,
        "points": results,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    _plot(results, out_dir / "throughput.png")
    if args.json:
        emit_json(result)
    else:
        _print(results)
        print(f"\nwrote {out_dir / 'result.json'} and {out_dir / 'throughput.png'}")
    return 0


def _measure(
    loaded: LoadedModel, dtype: HostDtype, point: Point, core: CoreRates, layer_numel: int, repeats: int
) -> dict[str, Any]:
    prompt = _prompt_ids(loaded, point.prompt_tokens)
    runs = [(mode.value, mode, False) for mode in MODES] + [(HINTED, TransportKind.PIPELLM, True)]
    rates: dict[str, float] = {}
    rounds: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    explore_shares: list[float] = []  # pipellm's rounds: exploring's excess seconds / the round's
    outputs: dict[str, list[list[int]]] = {}
    stats: dict[str, Any] = {}
    compute_per_layer = 0.0
    plain_outside_layers_s, plain_layers = 0.0, 0
    identical = True
    with ExitStack() as stack:
        engines: dict[str, LLMEngine] = {}
        for label, mode, hints in runs:  # every transport's engine lives through all rounds, as a server's
            config = EngineConfig(
                transport=mode,
                num_device_blocks=point.batch_size * -(-(point.prompt_tokens + point.new_tokens) // 16),
                num_host_blocks=0,
                max_num_seqs=point.batch_size,
                max_num_batched_tokens=max(2048, point.batch_size * point.prompt_tokens),
                offload=OffloadPolicy(host_dtype=dtype, batch_size=point.batch_size, hint_transport=hints),
            )
            engines[label] = engine = stack.enter_context(LLMEngine(loaded.model, config))
            # Three steps of warm-up: caches warm, the predictor sees a few cycles, and pipellm's
            # governor makes its first choice between speculating and sealing in the caller (a server
            # would have made it long before), so the rounds measure the steady state.
            _generate(engine, [prompt[:4]] * point.batch_size, 3)
        for round_index in range(repeats):
            # Interleaved rounds, every other one in reverse order (plain, cc, pipellm, hinted, then
            # hinted, pipellm, cc, plain): cc and pipellm always run side by side, each first in half
            # the rounds; each transport's best round counts.
            for label, mode, _ in runs if round_index % 2 == 0 else runs[::-1]:
                engine = engines[label]
                streamed, runner = engine.runner.weights.stats, engine.runner.stats
                before = (asdict(streamed), runner.layer_compute_s)
                explored = _explore_excess_s(engine)
                start = time.perf_counter()
                out = _generate(engine, [prompt] * point.batch_size, point.new_tokens)
                elapsed = time.perf_counter() - start
                if label == TransportKind.PIPELLM.value:
                    explore_shares.append((_explore_excess_s(engine) - explored) / elapsed)
                identical = identical and outputs.setdefault(label, out) == out
                rounds[label].append(point.tokens / elapsed)
                if point.tokens / elapsed <= rates.get(label, 0.0):
                    continue
                rates[label] = point.tokens / elapsed
                stats[label] = {
                    "streaming": asdict(streamed),
                    "layer_compute_s": runner.layer_compute_s,
                    "transport": asdict(engine.runner.transport.stats()),
                }
                if mode is TransportKind.PLAIN:
                    layers = streamed.layers_streamed - before[0]["layers_streamed"]
                    compute_s = runner.layer_compute_s - before[1]
                    wait_s = streamed.wait_s - before[0]["wait_s"]
                    compute_per_layer = compute_s / max(layers, 1)
                    plain_outside_layers_s, plain_layers = elapsed - compute_s - wait_s, layers
    host_bytes = layer_numel * torch.empty((), dtype=dtype.torch).element_size()
    seal_per_layer = host_bytes / (core.seal * 1e9)
    bound_per_layer = sealed_layer_bound_s(compute_per_layer, host_bytes, core)
    bound = point.tokens / (max(plain_outside_layers_s, 0.0) + plain_layers * bound_per_layer)
    gap = rates["plain"] - rates["cc"]
    paired = [p / c for p, c in zip(rounds["pipellm"], rounds["cc"], strict=True)]
    return {
        "host_dtype": dtype.value,
        "point": point.name,
        "batch_size": point.batch_size,
        "prompt_tokens": point.prompt_tokens,
        "new_tokens": point.new_tokens,
        **rates,
        "pipellm_vs_cc": rates["pipellm"] / rates["cc"],
        "pipellm_vs_cc_rounds": paired,
        "pipellm_vs_cc_median": statistics.median(paired),
        "pipellm_vs_cc_interval": median_interval(paired),
        "pipellm_explore_share_rounds": explore_shares,
        "rounds": rounds,
        "bound": bound,
        "cc_vs_bound": rates["cc"] / bound,
        "pipellm_vs_bound": rates["pipellm"] / bound,
        "gap_closure": (rates["pipellm"] - rates["cc"]) / gap if gap > 0 else None,
        "gap_closure_hinted": (rates[HINTED] - rates["cc"]) / gap if gap > 0 else None,
        "outputs_identical": identical and all(o == outputs["plain"] for o in outputs.values()),
        "compute_per_layer_ms": 1e3 * compute_per_layer,
        "seal_per_layer_ms": 1e3 * seal_per_layer,
        "bound_per_layer_ms": 1e3 * bound_per_layer,
        "hideable": compute_per_layer >= seal_per_layer,
        "stats": stats,
    }


def _generate(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy outputs of `prompts` batched together (no stop tokens: every row runs `new_tokens`)."""
    params = SamplingParams(max_tokens=new_tokens, stop_token_ids=())
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for step in engine.step():
            out[step.request_id] += step.new_token_ids
    return [out[i] for i in ids]


def _explore_excess_s(engine: LLMEngine) -> float:
    """Seconds the engine's transport spent so far trying the mode its governor did not hold, beyond
    the holding mode's cost (`GovernorStats.explore_excess_s`); 0 for a transport without one."""
    pipellm = engine.runner.transport.stats().pipellm
    return 0.0 if pipellm is None else pipellm.governor.explore_excess_s


def sealed_layer_bound_s(compute_s: float, layer_bytes: int, core: CoreRates) -> float:
    """The shortest time any sealed transport could take per streamed layer on this machine.

    A layer's compute (one thread), and its weights' seal, open and three copies
    (`CoreRates.sealed_transfer_core_seconds`) must all run somewhere: per layer that is at least the
    total core-seconds spread over the cores the machine delivers in parallel (`CoreRates.parallel`,
    measured: at most the core count), at least the compute itself, and at least what the one
    copy-engine thread must do in order (open and two copies).
    """
    transfer = core.sealed_transfer_core_seconds(layer_bytes)
    copy_engine_chain = layer_bytes * (1 / core.open + 2 / core.copy) / 1e9
    return max(compute_s, copy_engine_chain, (compute_s + transfer) / core.parallel)


def _prompt_ids(loaded: LoadedModel, num_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < num_tokens:
        ids += loaded.tokenizer(_TEXT).input_ids
    return ids[:num_tokens]


def _print(results: list[dict[str, Any]]) -> None:
    def closure(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = [
        [
            r["host_dtype"], r["point"], r["plain"], r["cc"], r["pipellm"], r[HINTED],
            r["pipellm_vs_cc"], r["pipellm_vs_cc_median"], _span(r["pipellm_vs_cc_interval"]),
            r["bound"], r["cc_vs_bound"], r["pipellm_vs_bound"],
            closure(r["gap_closure"]), closure(r["gap_closure_hinted"]),
            r["compute_per_layer_ms"], r["seal_per_layer_ms"], r["outputs_identical"],
        ]
        for r in results
    ]  # fmt: skip
    headers = [
        "dtype", "point", "plain tok/s", "cc tok/s", "pipellm tok/s", "hinted tok/s", "pipellm/cc",
        "median", "95% interval",
        "bound tok/s", "cc/bound", "pipellm/bound", "closure",
        "closure hinted", "compute/layer ms", "seal/layer ms", "identical",
    ]  # fmt: skip
    print_table(headers, rows)


def _span(interval: tuple[float, float] | None) -> str:
    return "-" if interval is None else f"{interval[0]:.2f}-{interval[1]:.2f}"


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["host_dtype"] for r in results})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        decode = [r for r in results if r["host_dtype"] == dtype and r["point"].startswith("decode")]
        batches = [r["batch_size"] for r in decode]
        for label in [mode.value for mode in MODES] + [HINTED]:
            ax.plot(batches, [r[label] for r in decode], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"offloaded decode, {dtype} host weights")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
