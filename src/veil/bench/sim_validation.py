"""The simulator against this machine: record the benches' workloads, replay them, compare.

For each of `veil bench offload` (its decode point), `veil bench kvswap` (its one level) and
`veil bench lora` (its Zipf mix), this records a trace of the same workload and engine configuration
under `plain` (the real engine, `veil.trace`; each recorded twice, the faster kept), replays it on a
profile of this machine (`veil.sim.calibrate`: per-core rates and parallelism measured now with the
transfer benchmark's `core_rates`, the roofline from `veil bench model`), and sets the predicted
tokens/s of plain, cc and pipellm beside the bench's measured ones (its JSON outputs, produced earlier
by `BENCH_COMMANDS`, `docs/figures/sim/run.sh`: each transport's best of 3).

Columns of each row (`error` = predicted / measured - 1):
- `predicted`: layers timed by the seconds the plain recording measured (so `plain` is calibrated on
  a plain run of the same workload; `cc` and `pipellm` are predictions), every host lane sharing the
  machine's cores, PipeLLM's governor on the virtual clock;
- `predicted_own_cores`: the same with no contention (every lane on a core of its own);
- `predicted_engine_bench`: layers timed by `EngineCompute`, fitted to `veil bench model`'s timing of
  the engine's own layers (when model.json has `engine_layers`): compute from the model benchmark,
  not from the recording, so `plain` is a prediction too;
- `predicted_roofline`: layers timed by the roofline fitted to `veil bench model`'s `generate`.
Each step's "host" span (scheduling, embedding, head, sampling) is replayed at its recorded seconds.
Warm-up steps the bench does not time are replayed but not measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.bench import adapters as lora_bench
from veil.bench import kvswap as kvswap_bench
from veil.bench import offload as offload_bench
from veil.bench.serve import drive
from veil.bench.transfer import core_rates
from veil.bench.workload import WorkloadSpec, make_workload
from veil.engine.engine import EngineConfig, LLMEngine, LoraConfig
from veil.engine.offload_policy import HostDtype, OffloadPolicy
from veil.engine.weights import compute_threads_beside_device
from veil.lora import random_adapter
from veil.model.llama import LayerWeights
from veil.model.loader import LoadedModel
from veil.sim.calibrate import EngineCompute, HostRates, ModelShape, machine_profile
from veil.sim.hardware import HardwareProfile
from veil.sim.replay import Mode, ReplayOptions, replay
from veil.trace import Trace, TraceRecorder

# The bench runs this validation reads (from the repository root; nice: the machine is shared).
BENCH_COMMANDS = {
    "transfer": "veil bench transfer --json > out/validate/transfer.json",
    "model": "veil bench model --batch-sizes 1 8 --new-tokens 16 --repeats 2 --json "
    "> out/validate/model.json",
    "offload": "veil bench offload --batch-sizes 8 --new-tokens 8 --prompt-tokens 16 --prefill-tokens 32 "
    "--host-dtypes fp32 --repeats 3 --json --out out/validate/offload > out/validate/offload.json",
    "kvswap": "3 x veil bench kvswap --requests 8 --mean-output 32 --max-output 64 --levels 0.3 --json "
    "--out out/validate/kvswap-$i > out/validate/kvswap-$i.json",
    "lora": "veil bench lora --adapters 8 --slots 2 --requests 12 --mean-output 8 --max-output 16 "
    "--max-num-seqs 4 --repeats 3 --json --out out/validate/lora > out/validate/lora.json",
}
RECORDINGS = 2  # each workload is recorded this many times under plain; the fastest is replayed
OFFLOAD = {"batch": 8, "new_tokens": 8, "prompt_tokens": 16, "warmup_tokens": 3}
KVSWAP = {"spec": WorkloadSpec(8, 0.0, 2, 32, 64, 0), "level": 0.3}  # 10 blocks swapped out
LORA = {"adapters": 8, "slots": 2, "rank": 8, "max_num_seqs": 4, "spec": WorkloadSpec(12, 0.0, 2, 8, 16, 0)}


@dataclass(frozen=True)
class Recording:
    """A trace and how many of its steps (start-up first) the bench does not time."""

    trace: Trace
    warmup_steps: int


def record_offload(loaded: LoadedModel) -> Recording:
    """`bench offload`'s decode point (fp32 host weights) under plain, warm-up included."""
    b, new, prompt_len = OFFLOAD["batch"], OFFLOAD["new_tokens"], OFFLOAD["prompt_tokens"]
    config = EngineConfig(
        num_device_blocks=b * -(-(prompt_len + new) // 16),
        num_host_blocks=0,
        max_num_seqs=b,
        max_num_batched_tokens=max(2048, b * prompt_len),
        offload=OffloadPolicy(host_dtype=HostDtype.FP32, batch_size=b),
    )
    prompt = offload_bench._prompt_ids(loaded, prompt_len)
    recorder = TraceRecorder(workload="offload", bench=BENCH_COMMANDS["offload"])
    with LLMEngine(loaded.model, config, recorder=recorder) as engine:
        offload_bench._generate(engine, [prompt[:4]] * b, OFFLOAD["warmup_tokens"])
        warmup = len(recorder.trace.steps)
        offload_bench._generate(engine, [prompt] * b, new)
    return Recording(recorder.trace, warmup)


def record_kvswap(loaded: LoadedModel) -> Recording:
    """`bench kvswap`'s first level under plain."""
    requests = make_workload(loaded.tokenizer, KVSWAP["spec"])
    blocks = kvswap_bench._device_blocks(requests, KVSWAP["level"])
    config = EngineConfig(block_size=16, num_device_blocks=blocks, num_host_blocks=4 * blocks)
    recorder = TraceRecorder(workload="kvswap", bench=BENCH_COMMANDS["kvswap"])
    with LLMEngine(loaded.model, config, recorder=recorder) as engine:
        warmup = len(recorder.trace.steps)
        drive(engine, requests)
    return Recording(recorder.trace, warmup)


def record_lora(loaded: LoadedModel) -> Recording:
    """`bench lora`'s Zipf mix under plain (engine hints on, as its `pipellm` run)."""
    rank = LORA["rank"]
    adapters = {
        f"adapter-{i:02d}": random_adapter(loaded.config, rank=rank, alpha=2 * rank, seed=i)
        for i in range(LORA["adapters"])
    }
    base = make_workload(loaded.tokenizer, LORA["spec"])
    requests = lora_bench.assign_adapters(base, list(adapters), "zipf", np.random.default_rng(0))
    longest = max(len(r.prompt_token_ids) + r.output_tokens for r in requests)
    seqs = LORA["max_num_seqs"]
    config = EngineConfig(
        num_device_blocks=seqs * -(-longest // 16),
        num_host_blocks=0,
        max_num_seqs=seqs,
        lora=LoraConfig(num_slots=LORA["slots"], max_rank=rank),
    )
    recorder = TraceRecorder(workload="lora", bench=BENCH_COMMANDS["lora"])
    with LLMEngine(loaded.model, config, recorder=recorder) as engine:
        for name, adapter in adapters.items():
            engine.add_adapter(name, adapter)
        warmup = len(recorder.trace.steps)
        drive(engine, requests)
    return Recording(recorder.trace, warmup)


def _best(files: list[Path], rows_of: str) -> dict[str, float]:
    """Each transport's best tokens/s over `files` (a bench's outputs), from their first row."""
    kinds = ("plain", "cc", "pipellm")
    runs = [json.loads(f.read_text())[rows_of][0] for f in files]
    if not runs:
        raise FileNotFoundError(f"no bench output among {files}")
    return {k: max(float(r[k]) for r in runs) for k in kinds}


def measured(results: Path) -> dict[str, dict[str, float]]:
    """Tokens/s per transport of the three benches, from their JSON outputs in `results`: each
    transport's best over `<bench>.json` and any `<bench>-<n>.json` (repeated runs)."""
    rows_of = {"offload": "points", "kvswap": "levels", "lora": "mixes"}
    return {
        bench: _best(sorted(results.glob(f"{bench}.json")) + sorted(results.glob(f"{bench}-*.json")), rows)
        for bench, rows in rows_of.items()
    }


def measure_host_rates() -> dict[str, Any]:
    """This machine's per-core rates (GB/s), parallelism and contention per pair of kinds of work now,
    with the transfer benchmark's code."""
    return {**dataclasses.asdict(core_rates(contention=True)), "cores": os.cpu_count() or 1}


def profile_of_this_machine(rates: dict[str, Any], results: Path, loaded: LoadedModel) -> HardwareProfile:
    """The calibrated profile from `rates` (`measure_host_rates`) and `results`/model.json."""
    model_bench = json.loads((results / "model.json").read_text())
    config = loaded.config
    params = config.num_layers * LayerWeights.numel(config) + config.vocab_size * config.hidden_size
    return machine_profile(HostRates.from_gbps(rates, int(rates["cores"])), model_bench, ModelShape(params))


def _tokens_per_s(trace: Trace) -> float:
    """What the recorded run measured over its timed steps."""
    steps = trace.steps[int(trace.meta["warmup_steps"]) :]
    return sum(s.tokens for s in steps) / sum(s.seconds for s in steps)


def record_all(loaded: LoadedModel, recordings: int = RECORDINGS) -> dict[str, Trace]:
    """Record the three benches' workloads, each `recordings` times, keeping the fastest (about a
    minute per round on 2 cores); each trace's meta says how many steps to leave unmeasured
    (`warmup_steps`) and what each recording measured (`recorded_tokens_per_s`)."""
    torch.set_num_threads(compute_threads_beside_device())
    traces = {}
    for bench, record in (("offload", record_offload), ("kvswap", record_kvswap), ("lora", record_lora)):
        runs = []
        for _ in range(recordings):
            rec = record(loaded)
            rec.trace.meta["warmup_steps"] = rec.warmup_steps
            runs.append(rec.trace)
        rates = [_tokens_per_s(t) for t in runs]
        best = runs[rates.index(max(rates))]
        best.meta["recorded_tokens_per_s"] = rates
        traces[bench] = best
    return traces


def validate(
    results: Path, traces: dict[str, Trace], loaded: LoadedModel, rates: dict[str, Any]
) -> dict[str, Any]:
    """Replay `traces` on the profile calibrated from `rates` and `results` and set each beside the
    measured tokens/s; returns the profile and one row per (bench, transport) (see the module doc)."""
    hw = profile_of_this_machine(rates, results, loaded)
    own_cores = dataclasses.replace(hw, host_cores=None, host_parallel=None)
    layers = json.loads((results / "model.json").read_text()).get("engine_layers")
    engine = EngineCompute.from_layers(layers) if layers else None
    truth = measured(results)
    rows = []
    for bench, trace in traces.items():
        roofline = ReplayOptions(warmup_steps=int(trace.meta["warmup_steps"]))
        recorded = dataclasses.replace(roofline, recorded_compute=True)
        for mode in Mode:
            main = replay(trace, hw, mode, recorded)
            value = truth[bench][mode.value]
            row = {"bench": bench, "transport": mode.value, "measured": value,
                   "recorded_plain": _tokens_per_s(trace), "predicted": main.tokens_per_s}  # fmt: skip
            figures = [
                ("", main.tokens_per_s),
                ("_own_cores", replay(trace, own_cores, mode, recorded).tokens_per_s),
                ("_roofline", replay(trace, hw, mode, roofline).tokens_per_s),
            ]
            if engine is not None:
                benched = dataclasses.replace(roofline, layer_seconds=engine)
                figures.append(("_engine_bench", replay(trace, hw, mode, benched).tokens_per_s))
            for name, figure in figures:
                row[f"predicted{name}"] = figure
                row[f"error{name}"] = figure / value - 1
            if main.governor is not None and main.stats is not None:
                row["governor"] = dataclasses.asdict(main.governor)
                row["hits"], row["requests"] = main.stats.hits, main.stats.requests
            rows.append(row)
    return {
        "profile": dataclasses.asdict(hw),
        "host_rates_gbps": rates,
        "bench_commands": BENCH_COMMANDS,
        "measured": truth,
        "validation": rows,
    }
