"""Replay a transfer trace (`veil.trace`) on a hardware profile under plain, cc or PipeLLM.

The host thread walks the trace's events in program order on a virtual clock:
- a `Transfer` (h2d / d2h) is split into 1 MiB chunks, each one `TransferKey(source_id, offset,
  length)` as the runtime's transport makes them (plain: one message per transfer, as veil's plain
  transport copies), and issued through the mode's sender (`senders.py`);
  a hint goes to the speculator (PipeLLM) and costs nothing otherwise;
- a `Compute` span starts once the host reaches it, the device is free, and the first `needs` data
  transfers have landed; it lasts its roofline time on the profile (or its recorded seconds). On a
  GPU the host launches it and moves on; with `compute_on_host` the host is busy until it ends.
  A span labelled "cpu" (host compute the device waits for, e.g. FlexGen's CPU attention) lasts its
  recorded seconds on the host thread, as every span does with `compute_on_host`;
PipeLLM runs the real `Speculator` and `default_predictor()`, and the runtime's governors on the
virtual clock (`ReplayOptions.governor`; one per phase, entered at each step the engine named, as the
runtime's `PhasedGovernor`); the workers' seal jobs read the source version the trace
says the buffer has at that point, so a stale pre-sealed chunk is never committed.
With `HardwareProfile.host_cores` every host lane (host thread and its compute, copy engine, sealing
workers, decryption lane) shares those cores (`cores.py`).

Deterministic: no threads, no wall clock, no randomness (misprediction injection is seeded).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from veil.pipellm import Decision, Direction, MiB, Speculator, SpeculatorConfig, SpeculatorStats, TransferKey
from veil.pipellm import default_predictor as _default_predictor
from veil.pipellm.governor import GovernorConfig, GovernorStats, Phase, PhasedGovernor
from veil.pipellm.governor import Mode as GovernorMode
from veil.pipellm.keys import chunks
from veil.pipellm.options import PipeLLMOptions
from veil.pipellm.submission import DEFAULT_SUBMIT_CHUNKS
from veil.sim.cores import Lane, host_cores
from veil.sim.hardware import HardwareProfile
from veil.sim.senders import PipeLLMSender, Sender, SyncSender, Wire
from veil.trace import Compute, Op, Step, Trace, Transfer


class Mode(Enum):
    PLAIN = "plain"  # no confidential computing: PCIe only
    CC = "cc"  # the caller seals each chunk right before sending it
    PIPELLM = "pipellm"  # the speculator decides; spare cores seal ahead


@dataclass(frozen=True)
class ReplayOptions:
    """How to replay a trace.

    Attributes:
        depth: PipeLLM reservations ahead (`SpeculatorConfig.depth`).
        max_pad: NOPs worth emitting to reach a pre-sealed chunk.
        speculate: False turns PipeLLM's speculation off.
        chunk_bytes: message size (the H100 driver and veil's link: 1 MiB).
        host_spans: replay the trace's "host" spans (engine work outside layers) at their recorded
            seconds; False drops them (a trace scaled to another machine).
        recorded_compute: time every span by its recorded seconds instead of the roofline.
        layer_seconds: times each layer span (its FLOPs, bytes, tokens, adapters) instead of the
            profile's roofline (e.g. `calibrate.EngineCompute`); ignored with `recorded_compute`.
        warmup_steps: steps replayed before the measured ones.
        record_ivs: keep every emitted h2d IV.
        max_period: the cyclic predictor's longest period (chunks); None: the runtime's default.
        decrypt_threads: PipeLLM's background decryption lanes for device-to-host chunks (the
            runtime's `PipeLLMOptions.decrypt_threads`, 1 on <= 2 cores; its lanes take whole
            transfers, these take chunks).
        submit_chunks: PipeLLM's pre-sealed chunks per submission (`PipeLLMOptions.submit_chunks`).
        governor: PipeLLM's do-no-harm governor, as the runtime configures it (default: the
            runtime's default, which measures whether speculation pays and may seal in the caller
            instead); `GovernorConfig(enabled=False)` pins speculation on, as the paper's PipeLLM.
    """

    depth: int = 32
    max_pad: int = 16
    speculate: bool = True
    chunk_bytes: int = MiB
    host_spans: bool = True
    recorded_compute: bool = False
    layer_seconds: Callable[[Compute], float] | None = None
    warmup_steps: int = 0
    record_ivs: bool = False
    max_period: int | None = None
    decrypt_threads: int = 1
    submit_chunks: int = DEFAULT_SUBMIT_CHUNKS
    governor: GovernorConfig = field(default_factory=GovernorConfig)


@dataclass(frozen=True)
class ReplayResult:
    """One mode's replay. Times are virtual seconds.

    Attributes:
        tokens_per_s: tokens of the measured steps over their time.
        step_ends: when each step's last event finished.
        start_s: when the measured steps began (end of the warm-up).
        wait_s: host time spent in `Wait` (pipellm).
        worker_busy_s: modelled sealing time of the spare cores (pipellm).
        stats: the speculator's counters (pipellm).
        ivs: every emitted h2d IV in emission order, if recorded.
        governor: what the governors measured and did, summed over the phases (pipellm).
        governor_by_phase: each phase's governor statistics, by `Phase` value (pipellm).
        host_work_s: single-core seconds placed on the shared host cores (with `host_cores`).
    """

    mode: Mode
    tokens_per_s: float
    step_ends: tuple[float, ...]
    start_s: float
    wait_s: float = 0.0
    worker_busy_s: float = 0.0
    stats: SpeculatorStats | None = None
    ivs: tuple[int, ...] | None = None
    governor: GovernorStats | None = None
    host_work_s: float = 0.0
    governor_by_phase: dict[str, GovernorStats] = field(default_factory=dict)


def replay(
    trace: Trace,
    hardware: HardwareProfile,
    mode: Mode,
    options: ReplayOptions | None = None,
    *,
    on_decision: Callable[[Decision], None] | None = None,
) -> ReplayResult:
    """Run `trace` on `hardware` under `mode`.

    Raises:
        ValueError: if the trace has no steps after the warm-up, or none of them generates tokens.
    """
    opts = options or ReplayOptions()
    if len(trace.steps) <= opts.warmup_steps:
        raise ValueError(f"the trace has {len(trace.steps)} steps, not more than {opts.warmup_steps} warm-up")
    run = _Run(trace, hardware, mode, opts, on_decision)
    ends = [run.step(step) for step in trace.steps]
    start = ends[opts.warmup_steps - 1] if opts.warmup_steps else 0.0
    tokens = sum(s.tokens for s in trace.steps[opts.warmup_steps :])
    elapsed = ends[-1] - start
    if tokens == 0 or elapsed <= 0:
        raise ValueError("the measured steps generate no tokens or take no time")
    ivs = tuple(run.wire.ivs) if run.wire.ivs is not None else None
    sender = run.sender
    work = run.cores.work_s if run.cores is not None else 0.0
    if isinstance(sender, PipeLLMSender):
        return ReplayResult(
            mode, tokens / elapsed, tuple(ends), start, sender.wait_s, sender.workers.busy_s,
            sender.speculator.stats, ivs, sender.governor_stats, work, sender.governor_by_phase,
        )  # fmt: skip
    return ReplayResult(mode, tokens / elapsed, tuple(ends), start, ivs=ivs, host_work_s=work)


class _Run:
    """The state of one replay: the host's sender, the device's compute queue, arrivals, versions."""

    def __init__(
        self,
        trace: Trace,
        hw: HardwareProfile,
        mode: Mode,
        opts: ReplayOptions,
        on_decision: Callable[[Decision], None] | None,
    ) -> None:
        self.hw, self.opts, self.mode = hw, opts, mode
        self.cores = host_cores(hw)
        crypto = hw.device_crypto_bytes_per_s
        link_cores = self.cores if hw.compute_on_host else None  # the emulated copy engine: a host thread
        self.wire = Wire(
            hw.pcie_h2d_bytes_per_s, record_ivs=opts.record_ivs, crypto_bytes_per_s=crypto, cores=link_cores
        )
        d2h = (
            Wire(hw.pcie_d2h_bytes_per_s, crypto_bytes_per_s=crypto, cores=link_cores)
            if hw.duplex
            else self.wire
        )
        self.versions: dict[int, int] = {}
        self.sender = self._sender(trace, mode, d2h, on_decision)
        self.arrivals: list[float] = []  # when each data transfer (h2d, d2h) landed
        self.device_free = 0.0

    def _sender(
        self, trace: Trace, mode: Mode, d2h: Wire, on_decision: Callable[[Decision], None] | None
    ) -> Sender:
        if mode is not Mode.PIPELLM:
            return SyncSender(self.wire, self.hw, seal=mode is Mode.CC, d2h_wire=d2h, cores=self.cores)
        opts = self.opts
        pipellm = PipeLLMOptions(
            depth=opts.depth, max_pad=opts.max_pad, speculate=opts.speculate, submit_chunks=opts.submit_chunks
        )
        config = pipellm.speculator_config(iv_limit=SpeculatorConfig().iv_limit, chunk_bytes=opts.chunk_bytes)
        predictor = (
            _default_predictor()
            if opts.max_period is None
            else _default_predictor(max_period=opts.max_period)
        )
        spec = Speculator(predictor, config)
        governor = PhasedGovernor(opts.governor)
        spec.hold(governor.mode is GovernorMode.SEAL_IN_CALLER)  # as the runtime's sealer starts it
        return PipeLLMSender(
            self.wire, self.hw, spec, spare_cores=self.hw.spare_cores, d2h_wire=d2h,
            version_of=lambda source_id: self.versions.get(source_id, 0), on_decision=on_decision,
            governor=governor, cores=self.cores, decrypt_threads=opts.decrypt_threads,
            submit_chunks=pipellm.submit_chunks,
        )  # fmt: skip

    def step(self, step: Step) -> float:
        """Replay one step's events; returns when its last one finished."""
        if step.phase and isinstance(self.sender, PipeLLMSender):
            self.sender.enter_phase(Phase(step.phase), self.sender.host_free)
        for event in step.events:
            if isinstance(event, Transfer):
                self._transfer(event)
            else:
                self._compute(event)
        return max(self.device_free, self.sender.host_free)

    def _transfer(self, e: Transfer) -> None:
        s, t = self.sender, self.sender.host_free
        direction = Direction.D2H if e.op is Op.D2H else Direction.H2D
        transfer = TransferKey(e.source_id, e.offset, e.nbytes, direction)
        # plain copies each transfer as one message (veil's plain transport, a cudaMemcpyAsync);
        # sealed modes split it into chunks, one IV each, as the runtime's transports do
        keys = [transfer] if self.mode is Mode.PLAIN else chunks(transfer, self.opts.chunk_bytes)
        if e.op is Op.HINT:
            self.versions[e.source_id] = max(self.versions.get(e.source_id, 0), e.version)
            if isinstance(s, PipeLLMSender):
                s.hint([transfer], t)
            return
        if e.op is Op.H2D:
            self.versions[e.source_id] = max(self.versions.get(e.source_id, 0), e.version)
            if isinstance(s, PipeLLMSender) and s.begin(transfer, t):
                arrived = max(s.send_quiet(key, t) for key in keys)
            else:
                arrived = s.send_transfer(keys, t, e.version)
        else:  # a worker seals the buffer only once this write is done: it bumps on entry and exit
            self.versions[e.source_id] = e.version + 2
            arrived = max(s.receive(key, t) for key in keys)
            if isinstance(s, PipeLLMSender):
                s.observe_device_to_host(transfer)
        self.arrivals.append(arrived)

    def _compute(self, e: Compute) -> None:
        if e.label == "host" and not self.opts.host_spans:
            return
        if self.opts.recorded_compute or e.label in ("host", "cpu"):
            duration = e.seconds
        elif self.opts.layer_seconds is not None:
            duration = self.opts.layer_seconds(e)
        else:
            duration = self.hw.compute_seconds(e.flops, e.nbytes)
        ready = self.arrivals[e.needs - 1] if e.needs else 0.0
        start = max(self.sender.host_free, ready, self.device_free)
        # the emulated device computes on the host thread, on the host cores; a "cpu" span (FlexGen's
        # CPU attention) runs on the host thread itself, and the device waits for its result
        if self.hw.compute_on_host or e.label == "cpu":
            self.device_free = self.sender.work(start, duration, Lane.COMPUTE)
            self.sender.occupy_host(self.device_free)
        else:
            self.device_free = start + duration
            self.sender.occupy_host(start)


def scale_trace(trace: Trace, *, bytes_factor: float, flops_factor: float, host_spans: bool = False) -> Trace:
    """The trace of the same run on a bigger model: every transfer's bytes (and offsets) times
    `bytes_factor`, every compute span's FLOPs and bytes times `flops_factor`; "host" spans (engine
    overhead of the recording machine) dropped unless `host_spans`.

    Raises:
        ValueError: if a factor is not positive.
    """
    if bytes_factor <= 0 or flops_factor <= 0:
        raise ValueError("bytes_factor and flops_factor must be > 0")
    steps = []
    for s in trace.steps:
        events: list[Transfer | Compute] = []
        for e in s.events:
            if isinstance(e, Transfer):
                events.append(
                    dataclasses.replace(
                        e, offset=round(e.offset * bytes_factor), nbytes=round(e.nbytes * bytes_factor)
                    )
                )
            elif host_spans or e.label != "host":
                events.append(
                    dataclasses.replace(e, flops=e.flops * flops_factor, nbytes=e.nbytes * flops_factor)
                )
        steps.append(Step(events, s.tokens, s.seconds))
    return Trace(steps, {**trace.meta, "scaled": {"bytes": bytes_factor, "flops": flops_factor}})


def inject_mispredictions(trace: Trace, rate: float, *, seed: int = 0) -> Trace:
    """A copy of `trace` where each h2d transfer, with probability `rate`, comes from a buffer never
    seen before (same size): a transfer no predictor can foresee, in place of the expected one.

    Raises:
        ValueError: if `rate` is not in [0, 1].
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    rng = random.Random(seed)
    fresh = 1 + max((e.source_id for e in trace.transfers()), default=0)
    steps = []
    for s in trace.steps:
        events: list[Transfer | Compute] = []
        for e in s.events:
            if isinstance(e, Transfer) and e.op is Op.H2D and rng.random() < rate:
                e = dataclasses.replace(e, source_id=fresh, version=0)
                fresh += 1
            events.append(e)
        steps.append(Step(events, s.tokens, s.seconds))
    return Trace(steps, {**trace.meta, "mispredict_rate": rate, "mispredict_seed": seed})
