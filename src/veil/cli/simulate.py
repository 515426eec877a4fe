"""`veil simulate`: PipeLLM's workloads on modelled hardware, and the simulator's check against this machine.

Scenarios:
- `paper`: FlexGen offloading, vLLM KV swapping and S-LoRA-like adapter swapping at 13B-175B on the
  H100 profile: per workload and model the CC drop and PipeLLM's residual overhead beside the paper's
  figures, the crypto cores PipeLLM needs for <= 5% (N cores: N sealing workers and N decryption
  lanes), the overhead under injected mispredictions and per decryption pool size, and a sensitivity
  sweep (crypto cores, PCIe bandwidth, batch, CPU attention) as a PNG.
- `replay`: one recorded trace (`--trace`, from `LLMEngine(recorder=...)`), optionally scaled to a
  bigger model and with mispredictions injected, under plain, cc and pipellm.
- `validation`: only the validation rows (below).

The H100 profile's host costs per message and per further chunk of a submission are assumptions
(4 and 0.5 us): `--message-us` and `--commit-us` set them, and the JSON's `hardware` records them.

Validation rows come from `--validate DIR` (records the benches' workloads now, minutes) or from a
validation file written by an earlier `--validate` (`--validation FILE`, default
out/validate/validation.json when it exists). See docs/sim.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from veil.bench.report import emit_json, print_table, progress
from veil.errors import UsageError
from veil.sim import H100_SXM_PCIE5, MODELS
from veil.sim.paper import (
    PAPER_PIPELLM_OVERHEAD_BELOW,
    TARGET_OVERHEAD,
    decryption_pool,
    paper_rows,
    plot_sensitivity,
    sensitivity,
    serving_options,
    serving_trace,
)
from veil.sim.replay import Mode, ReplayOptions, inject_mispredictions, replay, scale_trace
from veil.trace import Trace

DEFAULT_VALIDATION = Path("out/validate/validation.json")
MISPREDICT_RATES = (0.0, 0.05, 0.2)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("simulate", help="simulate PipeLLM's workloads on modelled hardware")
    parser.add_argument("--scenario", choices=["paper", "replay", "validation"], default="paper")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--spare-cores",
        type=int,
        default=H100_SXM_PCIE5.spare_cores,
        help="crypto cores: PipeLLM's sealing workers and decryption lanes",
    )
    parser.add_argument("--vaes", action="store_true", help="seal at the VAES rate instead of AES-NI")
    parser.add_argument(
        "--message-us",
        type=float,
        default=H100_SXM_PCIE5.message_s * 1e6,
        help="host cost of one message or submission, microseconds (an assumption)",
    )
    parser.add_argument(
        "--commit-us",
        type=float,
        default=H100_SXM_PCIE5.commit_s * 1e6,
        help="host cost of each further pre-sealed chunk of a submission, microseconds (an assumption)",
    )
    parser.add_argument("--png", type=Path, default=Path("out/simulate/sensitivity.png"), help="sweep plot")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sensitivity sweep")
    parser.add_argument("--validate", type=Path, metavar="DIR", help="bench results to validate against now")
    parser.add_argument("--validation", type=Path, metavar="FILE", help="a validation file written earlier")
    parser.add_argument(
        "--traces",
        type=Path,
        metavar="DIR",
        help="with --validate: replay traces recorded earlier (DIR/<bench>.json)",
    )
    parser.add_argument("--trace", type=Path, help="replay: the recorded trace")
    parser.add_argument("--scale-bytes", type=float, default=1.0, help="replay: transfer bytes factor")
    parser.add_argument("--scale-flops", type=float, default=1.0, help="replay: compute factor")
    parser.add_argument(
        "--mispredict", type=float, default=0.0, help="replay: share of h2d made unforeseeable"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.spare_cores < 0:
        raise UsageError("--spare-cores must be >= 0")
    if not (math.isfinite(args.message_us) and math.isfinite(args.commit_us)):
        raise UsageError("--message-us and --commit-us must be finite")
    if args.message_us < 0 or args.commit_us < 0:
        raise UsageError("--message-us and --commit-us must be >= 0")
    hw = dataclasses.replace(
        H100_SXM_PCIE5,
        spare_cores=args.spare_cores,
        vaes=args.vaes,
        message_s=args.message_us * 1e-6,
        commit_s=args.commit_us * 1e-6,
    )
    result: dict[str, Any] = {"hardware": dataclasses.asdict(hw)}
    if args.scenario == "replay":
        result["replay"] = _replay(args, hw)
    elif args.scenario == "paper":
        result.update(_paper(args, hw))
    result.update(_validation(args))
    if args.json:
        emit_json(result)
    else:
        _print(result)
    return 0


def _paper(args: argparse.Namespace, hw: Any) -> dict[str, Any]:
    progress("simulate: paper rows (3 workloads x 3-4 models, cores searched)")
    rows = [r.to_json() for r in paper_rows(MODELS, hw)]
    progress("simulate: injected mispredictions (KV swapping, OPT-13B)")
    trace = serving_trace("kvswap", MODELS["opt-13b"], hw)
    options = serving_options(trace, hw)
    plain = replay(trace, hw, Mode.PLAIN, options).tokens_per_s
    mispredictions = []
    for rate in MISPREDICT_RATES:
        pipellm = replay(inject_mispredictions(trace, rate, seed=1), hw, Mode.PIPELLM, options)
        assert pipellm.stats is not None
        mispredictions.append({"workload": "kvswap", "model": "opt-13b", "rate": rate,
                               "pipellm_overhead": 1 - pipellm.tokens_per_s / plain,
                               "hits": pipellm.stats.hits, "requests": pipellm.stats.requests})  # fmt: skip
    progress("simulate: KV swapping with decryption pools of 1 to 8 lanes")
    out: dict[str, Any] = {
        "paper": {"pipellm_overhead_below": PAPER_PIPELLM_OVERHEAD_BELOW, "target_overhead": TARGET_OVERHEAD},
        "rows": rows,
        "mispredictions": mispredictions,
        "decryption_pool": decryption_pool(MODELS, hw),
    }
    if not args.no_sweep:
        progress("simulate: sensitivity sweep (FlexGen offloading, OPT-30B)")
        sweeps = sensitivity(MODELS["opt-30b"], hw)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot_sensitivity(sweeps, "FlexGen offloading, OPT-30B, H100 profile", args.png)
        out["sensitivity"] = {
            "model": "opt-30b",
            "workload": "offload",
            "png": str(args.png),
            "sweeps": sweeps,
        }
    return out


def _replay(args: argparse.Namespace, hw: Any) -> dict[str, Any]:
    if args.trace is None:
        raise UsageError("--scenario replay needs --trace FILE")
    trace = Trace.load(args.trace)
    if args.scale_bytes != 1.0 or args.scale_flops != 1.0:
        trace = scale_trace(trace, bytes_factor=args.scale_bytes, flops_factor=args.scale_flops)
    if args.mispredict:
        trace = inject_mispredictions(trace, args.mispredict)
    options = ReplayOptions(warmup_steps=int(trace.meta.get("warmup_steps", 0)))
    figures = {mode.value: replay(trace, hw, mode, options).tokens_per_s for mode in Mode}
    return {"trace": str(args.trace), "tokens_per_s": figures,
            "cc_drop": 1 - figures["cc"] / figures["plain"],
            "pipellm_overhead": 1 - figures["pipellm"] / figures["plain"]}  # fmt: skip


def _validation(args: argparse.Namespace) -> dict[str, Any]:
    if args.validate is not None:
        from veil.bench.sim_validation import measure_host_rates, record_all, validate  # minutes
        from veil.model.loader import load_model

        loaded = load_model(progress=False)
        if args.traces is not None:
            traces = {b: Trace.load(args.traces / f"{b}.json") for b in ("offload", "kvswap", "lora")}
            saved = args.traces / "host_rates.json"
            rates = json.loads(saved.read_text()) if saved.exists() else measure_host_rates()
        else:
            progress("simulate: measuring per-core rates, recording the benches' workloads under plain")
            rates = measure_host_rates()
            traces = record_all(loaded)
            (args.validate / "traces").mkdir(parents=True, exist_ok=True)
            for name, trace in traces.items():
                trace.save(args.validate / "traces" / f"{name}.json")
            (args.validate / "traces" / "host_rates.json").write_text(json.dumps(rates, indent=2))
        out = validate(args.validate, traces, loaded, rates)
        (args.validate / "validation.json").write_text(json.dumps(out, indent=2))
        source = f"traces from {args.traces}" if args.traces is not None else "recorded now"
        return {"validation": out["validation"], "validation_source": f"{source}, against {args.validate}"}
    path = args.validation or (DEFAULT_VALIDATION if DEFAULT_VALIDATION.exists() else None)
    if path is None:
        return {"validation": [], "validation_source": None}
    if not path.exists():
        raise UsageError(f"no validation file at {path}; write one with --validate DIR")
    out = json.loads(path.read_text())
    return {"validation": out["validation"], "validation_source": str(path)}


def _print(result: dict[str, Any]) -> None:
    if "rows" in result:
        headers = ["workload", "model", "cc drop", "paper cc drop", "pipellm overhead", "cores for 5%"]
        table = [
            [r["workload"], r["model"], _pct(r["cc_drop"]), _pct(r.get("paper_cc_drop")),
             _pct(r["pipellm_overhead"]), r["cores_for_target"] or "-"]
            for r in result["rows"]
        ]  # fmt: skip
        print_table(headers, table)
    if "replay" in result:
        print(json.dumps(result["replay"], indent=2))
    if result["validation"]:
        print(f"\nvalidation ({result['validation_source']}):")
        headers = ["bench", "transport", "measured tok/s", "predicted", "error"]
        extra = [
            ("predicted_own_cores", "own cores"),
            ("predicted_engine_bench", "engine bench"),
            ("predicted_roofline", "roofline"),
        ]
        extra = [(key, name) for key, name in extra if any(key in v for v in result["validation"])]
        for _, name in extra:
            headers += [f"predicted ({name})", "error"]
        table = []
        for v in result["validation"]:
            row = [v["bench"], v["transport"], round(v["measured"], 2)]
            row += [round(v["predicted"], 2), _pct(v["error"])]
            for key, _ in extra:
                figure = v.get(key)
                row += ["-", "-"] if figure is None else [round(figure, 2), _pct(figure / v["measured"] - 1)]
            table.append(row)
        print_table(headers, table)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}" if value < 0 else f"{value:.1%}"
