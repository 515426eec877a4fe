"""`veil bench stream`: a cyclic stream of chunks with compute between them, under plain, cc and pipellm.

The workload is the offloading engine's shape without the model: `--sources` host buffers of
`--source-mib` each are loaded in cyclic order, one ahead (load i+1, wait for i, compute on i), for
`--rounds` rounds after four warm-up rounds, with `--compute-us` of compute per 1 MiB chunk. Each
transport runs the same sequence in this process. A second sequence deviates from the cycle at random
(`--mispredict`: each load is replaced by another source with that probability) and runs under all
three as well; a third run measures checked mode (hash at seal time, re-hash at commit).

Compute: `busy` (default) runs torch matmuls on one thread until the time is spent, so compute takes a
core, as it does in veil's emulator where the "device" computes on the CPU; on this 2-core machine
sealing workers and the copy engine then share the other core. `sleep` models a real accelerator,
whose compute leaves the CPU free. Figures are throughputs in GB/s of streamed weights.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import time
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import torch

from veil.bench.report import emit_json, median_interval, print_table, progress
from veil.bench.transfer import CoreRates, core_rates
from veil.cc.device import Device
from veil.cc.host import HostBuffer
from veil.cc.link import MIB
from veil.errors import UsageError
from veil.pipellm.governor import GovernorConfig
from veil.pipellm.options import PipeLLMOptions
from veil.transport import make_transport
from veil.transport.base import Transport, TransportKind

NAME = "stream"
HELP = "cyclic chunk stream with compute: plain vs cc vs pipellm throughput and gap closure"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this benchmark's options."""
    parser.add_argument("--sources", type=int, default=8, help="host buffers in the cycle (default 8)")
    parser.add_argument("--source-mib", type=int, default=4, help="MiB per source (default 4)")
    parser.add_argument("--rounds", type=int, default=16, help="timed rounds over the cycle (default 16)")
    parser.add_argument(
        "--compute-us",
        type=float,
        default=None,
        help="compute per 1 MiB chunk in microseconds (default: the measured sealing time of a chunk)",
    )
    parser.add_argument("--compute", choices=("busy", "sleep"), default="busy", help="see the module doc")
    parser.add_argument(
        "--repeats",
        type=int,
        default=12,
        help="interleaved rounds, every other one reversed; each transport's best counts, and the "
        "median pipellm / cc of rounds gets a 95%% interval from 6 rounds on (default 12)",
    )
    parser.add_argument("--mispredict", type=float, default=0.3, help="deviation probability (default 0.3)")
    defaults = PipeLLMOptions()
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help=f"pipellm sealing threads (default {defaults.workers}: cores left by compute and copy engine)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=defaults.depth,
        help=f"pipellm reservations ahead (default {defaults.depth})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the mispredicted sequence")


def run(args: argparse.Namespace) -> int:
    """Measure and print; returns the exit status."""
    if min(args.sources, args.source_mib, args.rounds, args.workers, args.repeats) < 1:
        raise UsageError("--sources, --source-mib, --rounds, --workers, --repeats must be >= 1")
    if not 0 <= args.mispredict <= 1:
        raise UsageError("--mispredict must be in [0, 1]")
    torch.set_num_threads(1)  # compute takes one core, like one device stream
    rates = core_rates()
    seal_us = _us_per_mib(rates.seal)
    compute_us = seal_us if args.compute_us is None else args.compute_us
    compute = _busy if args.compute == "busy" else _sleep
    pipellm = PipeLLMOptions(workers=args.workers, depth=args.depth)
    cyclic = list(range(args.sources)) * args.rounds
    deviating = _deviate(cyclic, args.sources, args.mispredict, random.Random(args.seed))
    spec = _Spec(args.sources, args.source_mib, compute_us, compute)

    results: dict[str, Any] = {"seal_us_per_chunk": round(seal_us, 1), "compute_us_per_chunk": compute_us}
    results["compute"] = args.compute
    progress("bench stream: cyclic")
    cyc = _best_of(args.repeats, spec, cyclic, pipellm)
    results.update({k: v["gbps"] for k, v in cyc.items()})
    results["gap_closure"] = _closure(cyc)
    results.update(_paired(cyc))
    results["stats"] = cyc["pipellm"]["stats"]
    progress("bench stream: mispredicted")
    mis = _best_of(args.repeats, spec, deviating, pipellm)
    results["mispredict"] = {
        "fraction": args.mispredict,
        **{k: v["gbps"] for k, v in mis.items()},
        "gap_closure": _closure(mis),
        **_paired(mis),
        "stats": mis["pipellm"]["stats"],
    }
    progress("bench stream: checked mode")
    with ExitStack() as stack:
        options = PipeLLMOptions(**{**_fields(pipellm), "checked": True})
        checked = _measure(_setup(stack, TransportKind.PIPELLM, spec, options), spec, cyclic)
    results["checked"] = {
        "pipellm": checked["gbps"],
        "check_s": checked["stats"]["check_s"],
        "mismatches": checked["stats"]["check_mismatches"],
        "digest_gbps": {name: _digest_gbps(fn) for name, fn in _DIGESTS.items()},
    }
    progress("bench stream: per-chunk costs")
    results["per_chunk_us"] = _per_chunk_costs(rates)
    if args.json:
        emit_json(results)
    else:
        _print(results)
    return 0


class _Spec:
    def __init__(
        self, sources: int, source_mib: int, compute_us: float, compute: Callable[[float], None]
    ) -> None:
        self.sources, self.source_mib, self.compute_us, self.compute = (
            sources,
            source_mib,
            compute_us,
            compute,
        )


def _best_of(
    repeats: int, spec: _Spec, sequence: list[int], pipellm: PipeLLMOptions
) -> dict[str, dict[str, Any]]:
    """Every transport over `sequence` in `repeats` interleaved rounds; each keeps its best round.

    Each transport (with its device and sources) lives through all rounds and warms up once, as a
    server's would; every other round runs them in reverse order, so that cc and pipellm always run
    side by side, each first in half the rounds. The figures also hold every round's throughput
    (`rounds`).
    """
    best: dict[str, dict[str, Any]] = {}
    kinds = list(TransportKind)
    with ExitStack() as stack:
        setups = {kind: _setup(stack, kind, spec, pipellm) for kind in kinds}
        for round_index in range(repeats):
            for kind in kinds if round_index % 2 == 0 else kinds[::-1]:
                figures = _measure(setups[kind], spec, sequence)
                rounds = [*best.get(kind.value, {}).get("rounds", []), figures["gbps"]]
                if kind.value not in best or figures["gbps"] > best[kind.value]["gbps"]:
                    best[kind.value] = figures
                best[kind.value]["rounds"] = rounds
    return best


def _rounded(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [round(v, 3) for v in interval]


def _paired(figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """pipellm / cc of the best rounds, and per round (the two ran side by side in each)."""
    rounds = [p / c for p, c in zip(figures["pipellm"]["rounds"], figures["cc"]["rounds"], strict=True)]
    return {
        "pipellm_vs_cc": round(figures["pipellm"]["gbps"] / figures["cc"]["gbps"], 3),
        "pipellm_vs_cc_rounds": [round(r, 3) for r in rounds],
        "pipellm_vs_cc_median": round(statistics.median(rounds), 3),
        "pipellm_vs_cc_interval": _rounded(median_interval(rounds)),
    }


@dataclass(frozen=True)
class _Setup:
    """One transport on its own device, its sources and its two destination buffers."""

    transport: Transport
    sources: list[HostBuffer]
    buffers: list[Any]


def _setup(stack: ExitStack, kind: TransportKind, spec: _Spec, pipellm: PipeLLMOptions) -> _Setup:
    """Start `kind` (closed with `stack`) and warm it up: the predictor learns the cycle, the governor
    makes its first choice."""
    nbytes = spec.source_mib * MIB
    sources = [HostBuffer(torch.randint(0, 256, (nbytes,), dtype=torch.uint8)) for _ in range(spec.sources)]
    device = stack.enter_context(Device(capacity_bytes=4 * nbytes))
    options = pipellm if kind is TransportKind.PIPELLM else None
    transport = stack.enter_context(make_transport(kind, device, pipellm=options))
    setup = _Setup(transport, sources, [device.alloc(nbytes), device.alloc(nbytes)])
    _stream(setup, list(range(spec.sources)) * 4, spec)
    return setup


def _measure(setup: _Setup, spec: _Spec, sequence: list[int]) -> dict[str, Any]:
    start = time.perf_counter()
    _stream(setup, sequence, spec)
    elapsed = time.perf_counter() - start
    pipellm_stats = setup.transport.stats().pipellm
    stats = None if pipellm_stats is None else asdict(pipellm_stats)
    nbytes = spec.source_mib * MIB
    return {"gbps": round(len(sequence) * nbytes / elapsed / 1e9, 3), "stats": stats}


def _stream(setup: _Setup, order: list[int], spec: _Spec) -> None:
    """Load one ahead: issue load i+1, wait for load i, compute on it."""
    transport, sources, buffers = setup.transport, setup.sources, setup.buffers
    chunk_s = spec.compute_us * 1e-6 * spec.source_mib
    pending = transport.h2d(sources[order[0]], buffers[0])
    for i in range(len(order)):
        following = transport.h2d(sources[order[i + 1]], buffers[(i + 1) % 2]) if i + 1 < len(order) else None
        pending.wait()
        spec.compute(chunk_s)
        if following is not None:
            pending = following


def _per_chunk_costs(rates: CoreRates, rounds: int = 10) -> dict[str, float]:
    """Where a 1 MiB chunk's time goes on the caller's side, in microseconds (medians).

    `seal` and `copy` are the raw primitives. The transports' figures are the caller's time inside
    `h2d` per chunk, with idle gaps between transfers so that workers and the copy engine keep up:
    `cc` seals and copies each chunk; `pipellm_commit` (speculation pinned on, every chunk pre-sealed
    and, where a slot was spare, already copied into it by the worker) decides and emits;
    `pipellm_quiet` (speculation off) decides the transfer in one call and sends it as `cc` does.
    What exceeds the primitives is bookkeeping and waiting (for the ring, for the GIL). Each figure is
    the best of three interleaved runs' medians.
    """
    sources = [HostBuffer(torch.randint(0, 256, (4 * MIB,), dtype=torch.uint8)) for _ in range(4)]
    figures = {"seal": _us_per_mib(rates.seal), "copy": _us_per_mib(rates.copy)}
    cases = {
        "cc": (TransportKind.CC, None),
        "pipellm_commit": (TransportKind.PIPELLM, PipeLLMOptions(governor=GovernorConfig(enabled=False))),
        "pipellm_quiet": (TransportKind.PIPELLM, PipeLLMOptions(speculate=False)),
    }
    medians: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(3):  # interleaved, so drift on a shared machine hits every case alike
        for name, (kind, options) in cases.items():
            with (
                Device(capacity_bytes=8 * MIB) as device,
                make_transport(kind, device, pipellm=options) as transport,
            ):
                target, times = device.alloc(4 * MIB), []
                for round_ in range(rounds):
                    for source in sources:
                        time.sleep(0.01)  # let the workers seal ahead and the copy engine drain
                        start = time.perf_counter()
                        event = transport.h2d(source, target)
                        if round_ >= 3:  # the cycle is learned and pre-sealed by then
                            times.append(time.perf_counter() - start)
                        event.wait()
            medians[name].append(statistics.median(times) / 4 * 1e6)
    figures.update({name: min(values) for name, values in medians.items()})
    return {name: round(value, 1) for name, value in figures.items()}


def _us_per_mib(gbps: float) -> float:
    """Microseconds one core needs for 1 MiB at `gbps` (GB/s)."""
    return MIB / (gbps * 1e9) * 1e6


def _deviate(cyclic: list[int], sources: int, fraction: float, rng: random.Random) -> list[int]:
    return [
        rng.choice([s for s in range(sources) if s != x]) if rng.random() < fraction else x for x in cyclic
    ]


_A = torch.randn(96, 96)


def _busy(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        torch.mm(_A, _A)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


_DIGESTS: dict[str, Callable[[memoryview], object]] = {
    "crc32": zlib.crc32,
    "blake2b": lambda m: hashlib.blake2b(m, digest_size=16).digest(),
}


def _digest_gbps(digest: Callable[[memoryview], object]) -> float:
    data = memoryview(bytearray(os.urandom(MIB)))
    start = time.perf_counter()
    for _ in range(32):
        digest(data)
    return round(32 * MIB / (time.perf_counter() - start) / 1e9, 3)


def _closure(figures: dict[str, dict[str, Any]]) -> float | None:
    plain, cc, ours = (figures[k]["gbps"] for k in ("plain", "cc", "pipellm"))
    return None if plain <= cc else round((ours - cc) / (plain - cc), 3)


def _fields(options: PipeLLMOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in options.__dataclass_fields__}


def _print(results: dict[str, Any]) -> None:
    mis = results["mispredict"]
    print(
        f"compute {results['compute']}: {results['compute_us_per_chunk']:.0f} us per MiB chunk; "
        f"sealing {results['seal_us_per_chunk']:.0f} us per chunk (1 core)"
    )
    print_table(
        ["stream", "plain GB/s", "cc GB/s", "pipellm GB/s", "gap closure"],
        [
            ["cyclic", results["plain"], results["cc"], results["pipellm"], results["gap_closure"]],
            [
                f"{mis['fraction']:.0%} mispredicted",
                mis["plain"],
                mis["cc"],
                mis["pipellm"],
                mis["gap_closure"],
            ],
        ],
    )
    s, c = results["stats"], results["checked"]
    sp = s["speculator"]
    print(
        f"\npipellm cyclic: hits {sp['hits']}, misses {sp['misses']}, nops {sp['nops']}, "
        f"relinquishes {sp['relinquishes']}, waited {s['wait_s']:.3f} s, "
        f"sealed in caller {s['sync_seal_s']:.3f} s"
    )
    for name, r in (("cyclic", results), ("mispredicted", mis)):
        print(
            f"{name}: pipellm / cc = {r['pipellm_vs_cc']:.3f} (best rounds), {r['pipellm_vs_cc_median']:.3f} "
            f"(median of rounds, 95% interval {r['pipellm_vs_cc_interval'] or 'needs >= 6 rounds'})"
        )
    print(f"caller's time per 1 MiB chunk, us: {results['per_chunk_us']}")
    print(
        f"checked mode: {c['pipellm']} GB/s (re-hashing {c['check_s']:.3f} s); "
        f"digests GB/s: {c['digest_gbps']}"
    )
