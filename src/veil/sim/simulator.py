"""FlexGen weight offloading on a virtual clock, under plain, cc and PipeLLM.

Every decode step streams every decoder layer's weights host-to-device in 1 MiB chunks (one
`TransferKey` per chunk, stable across steps) while the previous layer computes: the load of layer
j+1 is issued when layer j starts computing (double buffering), and layer j starts computing when all
of its chunks have arrived and layer j-1 has finished. Layers are identical, so the timeline is
periodic per layer; to keep a run under `max_requests` speculator calls, only `layers_in_cycle`
layers are streamed in a cycle and the per-layer time is scaled to the whole model.

Deterministic: no threads, no wall clock, no randomness. See docs/sim.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from veil.pipellm import MiB, SpeculatorStats
from veil.pipellm.governor import GovernorConfig
from veil.sim.hardware import HardwareProfile, ModelProfile, decode_layer_cost, decode_layer_seconds
from veil.sim.replay import Mode, ReplayOptions, replay
from veil.trace import Compute, Op, Step, Trace, Transfer


@dataclass(frozen=True)
class Scenario:
    """One simulated configuration.

    Attributes:
        model: what is offloaded.
        hardware: GPU, link and CPU.
        batch: sequences decoded together (tokens per step).
        context_tokens: KV-cache length each sequence attends over (attention compute and HBM reads).
        steps: measured passes over the streamed layers (decode steps when all layers are streamed).
        warmup_steps: passes before measuring (the cyclic predictor learns the period in the first and
            confirms it early in the second).
        offload_fraction: share of each layer's weights kept on the host and streamed every step.
        depth: PipeLLM reservations ahead (`SpeculatorConfig.depth`).
        speculate: False turns PipeLLM's speculation off (every chunk is sealed on the host's path).
        max_requests: cap on chunk requests per run, which bounds `layers_in_cycle`.
        layer_compute_s: compute time of one layer; None estimates it from the profiles.
    """

    model: ModelProfile
    hardware: HardwareProfile
    batch: int
    context_tokens: int = 512
    steps: int = 2
    warmup_steps: int = 2
    offload_fraction: float = 1.0
    depth: int = 32
    speculate: bool = True
    max_requests: int = 30_000
    layer_compute_s: float | None = None

    def __post_init__(self) -> None:
        if self.batch < 1 or self.steps < 1 or self.warmup_steps < 0 or self.max_requests < 1:
            raise ValueError("batch, steps and max_requests must be >= 1, warmup_steps >= 0")
        if not 0 < self.offload_fraction <= 1:
            raise ValueError(f"offload_fraction must be in (0, 1], got {self.offload_fraction}")
        if self.layer_compute_s is not None and self.layer_compute_s < 0:
            raise ValueError("layer_compute_s must be >= 0")


@dataclass(frozen=True)
class Layout:
    """What one run streams: chunk lengths of one layer, how many layers cycle, compute per layer."""

    chunk_lengths: tuple[int, ...]
    layers_in_cycle: int
    compute_s: float

    @property
    def requests(self) -> int:
        return len(self.chunk_lengths) * self.layers_in_cycle


def layout(scenario: Scenario) -> Layout:
    """The streamed chunks and the number of layers that fit the request budget (at least one)."""
    streamed = math.ceil(scenario.model.layer_bytes * scenario.offload_fraction)
    lengths = tuple(min(MiB, streamed - offset) for offset in range(0, streamed, MiB))
    passes = scenario.warmup_steps + scenario.steps
    layers = max(1, min(scenario.model.layers, scenario.max_requests // (passes * len(lengths))))
    compute_s = scenario.layer_compute_s
    if compute_s is None:
        compute_s = decode_layer_seconds(
            scenario.model, scenario.hardware, batch=scenario.batch, context_tokens=scenario.context_tokens
        )
    return Layout(lengths, layers, compute_s)


@dataclass(frozen=True)
class ModeResult:
    """One mode's figures. Times are virtual seconds.

    Attributes:
        tokens_per_s: batch / (per-layer time x model layers).
        layer_s: mean time per streamed layer in the measured passes.
        wait_s: host time spent in `Wait` (pipellm), over all passes.
        worker_busy_s: modelled sealing time of the spare cores (pipellm), over all passes.
        stats: the speculator's counters (pipellm), over all passes.
        ivs: every emitted IV in emission order, if recorded.
    """

    mode: Mode
    tokens_per_s: float
    layer_s: float
    wait_s: float = 0.0
    worker_busy_s: float = 0.0
    stats: SpeculatorStats | None = None
    ivs: tuple[int, ...] | None = None


def simulate(scenario: Scenario, mode: Mode, *, record_ivs: bool = False) -> ModeResult:
    """Run `scenario` under `mode` and measure its steady-state throughput."""
    lay = layout(scenario)
    options = ReplayOptions(
        depth=scenario.depth,
        speculate=scenario.speculate,
        recorded_compute=True,
        warmup_steps=scenario.warmup_steps,
        record_ivs=record_ivs,
        max_period=max(lay.requests, 1),
        governor=GovernorConfig(enabled=False),  # the paper's PipeLLM always speculates
    )
    result = replay(flexgen_trace(scenario, lay), scenario.hardware, mode, options)
    layer_s = (result.step_ends[-1] - result.start_s) / (scenario.steps * lay.layers_in_cycle)
    tokens_per_s = scenario.batch / (layer_s * scenario.model.layers)
    return ModeResult(
        mode, tokens_per_s, layer_s, result.wait_s, result.worker_busy_s, result.stats, result.ivs
    )


def flexgen_trace(scenario: Scenario, lay: Layout) -> Trace:
    """FlexGen's schedule as a trace: per pass, each streamed layer's load, then its compute.

    Layer j's load is issued when the host reaches it, right after it launched layer j-1 (double
    buffering), and layer j computes once its load has landed and layer j-1 is done.
    """
    streamed = sum(lay.chunk_lengths)
    model, batch = scenario.model, scenario.batch
    flops, nbytes = decode_layer_cost(model, batch=batch, context_tokens=scenario.context_tokens)
    steps, transfers = [], 0
    for _ in range(scenario.warmup_steps + scenario.steps):
        events: list[Transfer | Compute] = []
        for layer in range(lay.layers_in_cycle):
            events.append(Transfer(Op.H2D, layer, 0, streamed, 0))
            transfers += 1
            events.append(Compute(flops, nbytes, lay.compute_s, transfers))
        steps.append(Step(events, tokens=batch))
    return Trace(steps, {"workload": "offload", "model": model.name, "batch": batch})


@dataclass(frozen=True)
class Comparison:
    """The three modes on one scenario.

    Attributes:
        gap_closure: (pipellm - cc) / (plain - cc) in tokens/s; None when cc costs nothing.
        cc_drop: 1 - cc / plain (the paper's "throughput drop" with CC on).
        pipellm_cost: 1 - pipellm / plain (the paper claims < 19.6%).
    """

    layout: Layout
    plain: ModeResult
    cc: ModeResult
    pipellm: ModeResult

    @property
    def gap_closure(self) -> float | None:
        gap = self.plain.tokens_per_s - self.cc.tokens_per_s
        if gap <= 1e-9 * self.plain.tokens_per_s:
            return None
        return (self.pipellm.tokens_per_s - self.cc.tokens_per_s) / gap

    @property
    def cc_drop(self) -> float:
        return 1 - self.cc.tokens_per_s / self.plain.tokens_per_s

    @property
    def pipellm_cost(self) -> float:
        return 1 - self.pipellm.tokens_per_s / self.plain.tokens_per_s


def compare(scenario: Scenario) -> Comparison:
    """Simulate all three modes on `scenario`."""
    return Comparison(
        layout(scenario),
        simulate(scenario, Mode.PLAIN),
        simulate(scenario, Mode.CC),
        simulate(scenario, Mode.PIPELLM),
    )
