"""A hardware profile of this machine's emulated device, calibrated from measurements.

Inputs: one core's rates at each piece of a sealed transfer (`HostRates`: AES-GCM seal and open, the
byte copy, and what all cores deliver at once; measured by `veil.bench.transfer.core_rates`, the
transfer benchmark's per-core figures), `veil bench model`'s decode tokens/s at batch 1 and 8, and the
model's shape. The emulated device differs from an H100 in ways the profile states:
- its copy engine is one host thread (`duplex=False`): a plain message costs it one copy (the
  "link" rate); a sealed h2d message an open and two copies (out of the bounce slot, into the
  destination), so `device_crypto_bytes_per_s` is the open and the extra copy together; a d2h message
  the same work the other way (its seal taken at the open rate: they are within 15% here);
- the host seals a chunk and copies it into the bounce slot (`aes_gcm_bytes_per_s` is the two
  together), and opens a d2h chunk and copies it out (`aes_gcm_open_bytes_per_s`);
- compute runs on the host thread (`compute_on_host`); every lane (caller, copy engine, PipeLLM's
  sealing worker and decryption thread) shares the machine's cores (`host_cores`; `veil.sim.cores`),
  each lane at the speed measured for its kind of work beside the other busy lane's
  (`host_pairs`, from `CoreRates.contention`) when measured, else all at the one parallel speed
  measured on sealing (`host_parallel`);
- the roofline (`gpu_flops`, `hbm_bytes_per_s`) is fitted to the model benchmark's `generate` figures:
  batch 1 decode is taken as memory-bound (weights read once per token: bytes / time gives the
  bandwidth) and batch 8 as compute-bound where it is slower than that bandwidth allows (FLOPs /
  time). `generate` is not the engine's path; `EngineCompute` is fitted to the model benchmark's
  timing of the engine's own layers (`engine_layers`), and the validation reports both;
- PipeLLM's sealing workers: the runtime's default, one thread (`default_workers()` on 2 cores);
- a message's fixed host cost is assumed 100 us (Python transport, events, ring slot).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from veil.sim.hardware import GB, HardwareProfile
from veil.trace import Compute

MESSAGE_S = 100e-6  # assumed fixed host cost of one message in veil's Python transport
# A chunk that joins a submission costs veil's caller about as much again: its speculator decision
# (67-110 us per chunk measured on the 2-core CI machine) and its share of the submission (7-20 us).
COMMIT_S = MESSAGE_S


@dataclass(frozen=True)
class HostRates:
    """One core's speed at each piece of a sealed transfer's work, and the machine's parallelism.

    Attributes:
        seal: AES-GCM sealing, bytes/s.
        open: AES-GCM opening (tag checked), bytes/s.
        copy: the channel's byte copy, bytes/s.
        parallel: single-core speeds all cores deliver at once (at most `cores`).
        cores: the machine's cores.
        contention: each kind's speed beside each other kind (`CoreRates.contention`); None when not
            measured (older calibration files).
    """

    seal: float
    open: float
    copy: float
    parallel: float
    cores: int
    contention: Mapping[str, Mapping[str, float]] | None = None

    @classmethod
    def from_gbps(cls, rates: dict[str, Any], cores: int) -> HostRates:
        """From `veil.bench.transfer.CoreRates` as a dict (GB/s, `parallel` in cores; `contention`
        when present)."""
        return cls(
            float(rates["seal"]) * GB, float(rates["open"]) * GB, float(rates["copy"]) * GB,
            float(rates["parallel"]), cores, rates.get("contention"),
        )  # fmt: skip


def _serial(*rates: float) -> float:
    """The rate of doing each of `rates`' work in turn on one core."""
    return 1.0 / sum(1.0 / r for r in rates)


@dataclass(frozen=True)
class ModelShape:
    """What the roofline fit needs of the benchmarked model (veil runs it in fp32)."""

    params: int  # every weight read per decode step (decoder layers, embedding-free head)
    bytes_per_param: int = 4

    def step_cost(self, batch: int) -> tuple[float, float]:
        """(FLOPs, bytes) of one decode step of `batch` sequences (short contexts: attention ignored)."""
        return 2.0 * self.params * batch, float(self.params * self.bytes_per_param)


@dataclass(frozen=True)
class LayerCurve:
    """Seconds of one decoder-layer pass over its FLOPs, piecewise linear between measured points.

    Below the cheapest point, that point's seconds (fixed costs dominate there); above the costliest,
    at that point's FLOP rate.
    """

    flops: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.flops or len(self.flops) != len(self.seconds):
            raise ValueError("need as many seconds as FLOPs, at least one")
        if list(self.flops) != sorted(set(self.flops)) or min(self.flops) <= 0 or min(self.seconds) <= 0:
            raise ValueError("FLOPs must be distinct, positive and increasing; seconds positive")

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], *, merge_within: float = 0.05) -> LayerCurve:
        """From `engine_layers` rows (`flops`, `seconds`, `spans`): rows whose FLOPs are within
        `merge_within` of a group's first are one point, their FLOPs and seconds averaged weighted by
        spans (a decode batch's steps differ only by a few context positions, and their medians by
        noise, which interpolating between them would turn into a jagged curve)."""
        groups: list[list[dict[str, Any]]] = []
        for row in sorted(rows, key=lambda r: float(r["flops"])):
            if groups and float(row["flops"]) <= (1 + merge_within) * float(groups[-1][0]["flops"]):
                groups[-1].append(row)
            else:
                groups.append([row])
        points = [_weighted_point(group) for group in groups]
        return cls(tuple(f for f, _ in points), tuple(s for _, s in points))

    def __call__(self, flops: float) -> float:
        """Seconds of a pass of `flops`."""
        xs, ys = self.flops, self.seconds
        if flops <= xs[0]:
            return ys[0]
        if flops >= xs[-1]:
            return ys[-1] * flops / xs[-1]
        i = bisect_right(xs, flops)
        share = (flops - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + share * (ys[i] - ys[i - 1])


def _weighted_point(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(FLOPs, seconds) of `rows` averaged, each weighted by its `spans` (default 1)."""
    weights = [float(r.get("spans", 1)) for r in rows]
    total = sum(weights)
    flops = sum(w * float(r["flops"]) for w, r in zip(weights, rows, strict=True)) / total
    seconds = sum(w * float(r["seconds"]) for w, r in zip(weights, rows, strict=True)) / total
    return flops, seconds


@dataclass(frozen=True)
class EngineCompute:
    """Seconds of one decoder-layer pass (a trace's layer span) on this machine, from the engine's
    measured passes (`veil bench model`'s `engine_layers`): one `LayerCurve` over FLOPs per number of
    distinct LoRA adapters in the pass (0: the base model; each adapter adds its matmuls' fixed costs
    per fused projection, which its few FLOPs do not show).

    A pass with an adapter count not measured takes the largest measured count below it, plus, per
    adapter beyond, the difference between that count's curve and the one below (when measured).
    Bytes are not used: on the host every pass reads the same fp32 weights and its KV reads are small.
    """

    curves: Mapping[int, LayerCurve]  # by distinct adapters in the pass; 0 must be present

    def __post_init__(self) -> None:
        if 0 not in self.curves or min(self.curves) < 0:
            raise ValueError(f"need a curve for 0 adapters and none below, got {sorted(self.curves)}")

    @classmethod
    def from_layers(cls, layers: list[dict[str, Any]], *, merge_within: float = 0.05) -> EngineCompute:
        """From `engine_layers` rows, grouped by their `adapters` (absent: 0), each group a
        `LayerCurve.from_rows`."""
        by_adapters: dict[int, list[dict[str, Any]]] = {}
        for row in layers:
            by_adapters.setdefault(int(row.get("adapters", 0)), []).append(row)
        return cls(
            {k: LayerCurve.from_rows(rows, merge_within=merge_within) for k, rows in by_adapters.items()}
        )

    def seconds(self, flops: float, adapters: int = 0) -> float:
        """Seconds of a pass of `flops` whose rows use `adapters` distinct adapters."""
        known = max(k for k in self.curves if k <= adapters)
        base = self.curves[known](flops)
        if adapters > known and known - 1 in self.curves:
            return base + (adapters - known) * (base - self.curves[known - 1](flops))
        return base

    def __call__(self, span: Compute) -> float:
        """Seconds of a trace's layer span (one pass)."""
        return self.seconds(span.flops, span.adapters)


def machine_profile(
    rates: HostRates, model_bench: dict[str, Any], shape: ModelShape, *, workers: int = 1
) -> HardwareProfile:
    """The emulated device on this machine.

    Args:
        rates: measured per-core rates and parallelism.
        model_bench: `veil bench model --json` output with batches "1" and "8".
        shape: the benchmarked model.
        workers: PipeLLM sealing threads.

    Raises:
        KeyError: if a figure is missing from the model benchmark.
    """
    step_s = {int(b): int(b) / float(r["veil_tokens_per_s"]) for b, r in model_bench["batch"].items()}
    _, bytes_1 = shape.step_cost(1)
    bandwidth = bytes_1 / step_s[1]
    flops_8, bytes_8 = shape.step_cost(8)
    memory_bound_8 = bytes_8 / bandwidth
    flops_rate = flops_8 / step_s[8] if step_s[8] > memory_bound_8 else flops_8 / memory_bound_8
    device_side = _serial(rates.open, rates.copy)  # on top of the link's copy: open + 2 copies
    return HardwareProfile(
        name="this machine (emulated device, calibrated)",
        pcie_h2d_bytes_per_s=rates.copy,
        pcie_d2h_bytes_per_s=rates.copy,
        aes_gcm_bytes_per_s=_serial(rates.seal, rates.copy),
        aes_gcm_vaes_bytes_per_s=_serial(rates.seal, rates.copy),
        aes_gcm_open_bytes_per_s=_serial(rates.open, rates.copy),
        device_crypto_bytes_per_s=device_side,
        duplex=False,
        compute_on_host=True,
        host_cores=rates.cores,
        host_parallel=min(rates.parallel, float(rates.cores)),
        host_pairs=rates.contention,
        spare_cores=workers,
        gpu_flops=flops_rate,
        flops_efficiency=1.0,
        hbm_bytes_per_s=bandwidth,
        hbm_efficiency=1.0,
        message_s=MESSAGE_S,
        commit_s=COMMIT_S,
    )
