"""The simulator against this machine: record the benches' workloads, replay them, compare.

For each of `veil bench offload` (its decode point), `veil bench kvswap` (its first level) and
`veil bench lora` (its Zipf mix), this records a trace of the same workload and engine configuration
under `plain` (the real engine, `veil.trace`), replays it on a profile of this machine calibrated from
`veil bench transfer` and `veil bench model` (`veil.sim.calibrate`), and sets the predicted tokens/s
of plain, cc and pipellm beside the bench's measured ones (its result.json, produced earlier by the
command given with `BENCH_COMMANDS`; `out/validate/run.sh` runs all five).

Layer spans are timed by the calibrated roofline; each step's "host" span (scheduling, embedding,
head, sampling: work outside layers and transfers) is replayed at the seconds recorded in the plain
run. Warm-up steps the bench does not time are replayed but not measured.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.bench import adapters as lora_bench
from veil.bench import kvswap as kvswap_bench
from veil.bench import offload as offload_bench
from veil.bench.serve import drive
from veil.bench.workload import WorkloadSpec, make_workload
from veil.engine.engine import EngineConfig, LLMEngine, LoraConfig
from veil.engine.offload_policy import HostDtype, OffloadPolicy
from veil.engine.weights import compute_threads_beside_device
from veil.lora import random_adapter
from veil.model.llama import LayerWeights
from veil.model.loader import LoadedModel
from veil.sim.calibrate import ModelShape, machine_profile
from veil.sim.hardware import HardwareProfile
from veil.sim.replay import Mode, ReplayOptions, replay
from veil.trace import Trace, TraceRecorder

# The bench runs this validation reads (from the repository root; nice: the machine is shared).
BENCH_COMMANDS = {
    "transfer": "veil bench transfer --json > out/validate/transfer.json",
    "model": "veil bench model --batch-sizes 1 8 --new-tokens 16 --repeats 2 --json "
    "> out/validate/model.json",
    "offload": "veil bench offload --batch-sizes 8 --new-tokens 8 --prompt-tokens 16 --prefill-tokens 32 "
    "--host-dtypes fp32 --repeats 1 --json --out out/validate/offload > out/validate/offload.json",
    "kvswap": "veil bench kvswap --requests 8 --mean-output 16 --max-output 32 --levels 0.3 --json "
    "--out out/validate/kvswap > out/validate/kvswap.json",
    "lora": "veil bench lora --adapters 8 --slots 2 --requests 12 --mean-output 8 --max-output 16 "
    "--max-num-seqs 4 --repeats 1 --json --out out/validate/lora > out/validate/lora.json",
}
OFFLOAD = {"batch": 8, "new_tokens": 8, "prompt_tokens": 16, "warmup_tokens": 3}
KVSWAP = {"spec": WorkloadSpec(8, 0.0, 2, 16, 32, 0), "level": 0.3}
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


def measured(results: Path) -> dict[str, dict[str, float]]:
    """Tokens/s per transport of the three benches, from their JSON outputs in `results`."""
    offload = json.loads((results / "offload.json").read_text())["points"][0]
    kvswap = json.loads((results / "kvswap.json").read_text())["levels"][0]
    lora = json.loads((results / "lora.json").read_text())["mixes"][0]
    kinds = ("plain", "cc", "pipellm")
    return {
        name: {k: float(r[k]) for k in kinds}
        for name, r in (("offload", offload), ("kvswap", kvswap), ("lora", lora))
    }


def profile_of_this_machine(results: Path, loaded: LoadedModel) -> HardwareProfile:
    """The calibrated profile from `results`/transfer.json and model.json."""
    transfer = json.loads((results / "transfer.json").read_text())
    model_bench = json.loads((results / "model.json").read_text())
    config = loaded.config
    params = config.num_layers * LayerWeights.numel(config) + config.vocab_size * config.hidden_size
    return machine_profile(transfer, model_bench, ModelShape(params))


def record_all(loaded: LoadedModel) -> dict[str, Trace]:
    """Record the three benches' workloads (minutes on 2 busy cores); each trace's meta says how many
    steps to leave unmeasured (`warmup_steps`)."""
    torch.set_num_threads(compute_threads_beside_device())
    traces = {}
    for bench, record in (("offload", record_offload), ("kvswap", record_kvswap), ("lora", record_lora)):
        rec = record(loaded)
        rec.trace.meta["warmup_steps"] = rec.warmup_steps
        traces[bench] = rec.trace
    return traces


def validate(results: Path, traces: dict[str, Trace], loaded: LoadedModel) -> dict[str, Any]:
    """Replay `traces` on the profile calibrated from `results` and set each beside the measured
    tokens/s; returns the profile and one row per (bench, transport), `error` = predicted / measured - 1.

    `predicted` times layers by the roofline calibrated from the model benchmark (the profile);
    `predicted_recorded_compute` times them by the seconds the plain recording measured, which
    isolates the transfer and sealing model from the compute model.
    """
    hw = profile_of_this_machine(results, loaded)
    truth = measured(results)
    rows = []
    for bench, trace in traces.items():
        options = ReplayOptions(warmup_steps=int(trace.meta["warmup_steps"]))
        recorded = dataclasses.replace(options, recorded_compute=True)
        for mode in Mode:
            predicted = replay(trace, hw, mode, options).tokens_per_s
            from_recording = replay(trace, hw, mode, recorded).tokens_per_s
            value = truth[bench][mode.value]
            rows.append(
                {
                    "bench": bench,
                    "transport": mode.value,
                    "measured": value,
                    "predicted": predicted,
                    "error": predicted / value - 1,
                    "predicted_recorded_compute": from_recording,
                    "error_recorded_compute": from_recording / value - 1,
                }
            )
    return {"profile": dataclasses.asdict(hw), "bench_commands": BENCH_COMMANDS, "validation": rows}
