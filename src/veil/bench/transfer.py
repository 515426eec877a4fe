"""`veil bench transfer`: host<->device GB/s of each transport beside raw AES-GCM and memcpy.

All figures come from one process on this machine: `plain` and `cc` transfers at each size (median of
the repeats, timed from the call until its event completes), the channel's sealing rate alone, one
core's raw `AESGCM.encrypt_into` over 1 MiB chunks into a reused buffer, and `torch` `copy_`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.cc.bounce import BounceRing
from veil.cc.channel import TAG_BYTES, SenderChannel
from veil.cc.device import Device
from veil.cc.host import HostBuffer, copy_bytes, memory_of
from veil.cc.link import MIB
from veil.cc.session import agree
from veil.cc.stream import Event
from veil.errors import UsageError
from veil.sim.cores import Lane
from veil.transport import make_transport
from veil.transport.base import TransportKind

NAME = "transfer"
HELP = "host<->device GB/s of the plain and cc transports, with raw AES-GCM and memcpy for scale"
_RAW_BYTES = 64 * MIB
_KINDS = (TransportKind.PLAIN, TransportKind.CC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this benchmark's options."""
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[1, 16, 256],
        metavar="MIB",
        help="transfer sizes in MiB (default: 1 16 256)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is kept")


def run(args: argparse.Namespace) -> int:
    """Measure and print; returns the exit status."""
    if args.repeats < 1 or any(size < 1 for size in args.sizes):
        raise UsageError("--repeats and every --sizes value must be >= 1")
    results: dict[str, object] = {
        kind.value: _transport_figures(kind, args.sizes, args.repeats) for kind in _KINDS
    }
    results["raw_aesgcm_gbps"] = raw_aesgcm_gbps(args.repeats)
    results["cc_seal_gbps"] = _median_gbps(_RAW_BYTES, _channel_seal(), args.repeats)
    results["memcpy_gbps"] = _median_gbps(_RAW_BYTES, _memcpy(), args.repeats)
    results["contention"] = pair_contention(repeats=args.repeats)
    if args.json:
        print(json.dumps(results))
    else:
        _print_table(results, args.sizes)
    return 0


def raw_aesgcm_gbps(repeats: int = 3) -> float:
    """One core's raw `AESGCM.encrypt_into` speed over 1 MiB chunks into a reused buffer, GB/s."""
    return _median_gbps(_RAW_BYTES, _raw_aesgcm(), repeats)


@dataclass(frozen=True)
class CoreRates:
    """One core's speed at each piece of a sealed transfer's work, GB/s (1 MiB messages, reused buffers).

    Attributes:
        seal: `AESGCM.encrypt_into`.
        open: `AESGCM.decrypt_into` (tag checked).
        copy: the byte copy the channel uses (numpy, GIL released).
        parallel: how many single cores' worth of sealing the machine delivers when every core seals
            at once (aggregate over single-thread rate; at most the core count). Shared or throttled
            cores, and memory bandwidth, keep it below the count.
        contention: each kind of work's speed beside each other kind on another thread, relative to
            running alone (`pair_contention`: `contention[a][b]` is a's speed while b runs); None when
            not measured.
    """

    seal: float
    open: float
    copy: float
    parallel: float = 1.0
    contention: dict[str, dict[str, float]] | None = None

    def sealed_transfer_core_seconds(self, nbytes: int) -> float:
        """Core-seconds of work one sealed transfer of `nbytes` needs at minimum on this machine.

        Seal on the host, copy into the bounce slot, copy out of it on the device side, open, copy
        the verified plaintext into the destination: one seal, one open and three copies per byte.
        """
        return nbytes * (1 / self.seal + 1 / self.open + 3 / self.copy) / 1e9


def core_rates(repeats: int = 3, *, contention: bool = False) -> CoreRates:
    """Measure `CoreRates` on this machine now (about a second; with `contention`, the pair factors
    too: about six more seconds)."""
    seal = _median_gbps(_RAW_BYTES, _raw_aesgcm(), repeats)
    return CoreRates(
        seal=seal,
        open=_median_gbps(_RAW_BYTES, _raw_open(), repeats),
        copy=_median_gbps(_RAW_BYTES, _byte_copy(), repeats),
        parallel=_parallel_scaling(seal, os.cpu_count() or 1),
        contention=pair_contention(repeats=repeats) if contention else None,
    )


WORK_KINDS = tuple(lane.value for lane in Lane)  # what a host lane of the emulated device does
_LAYER_ROWS, _LAYER_WIDTH, _LAYER_FFN = 8, 576, 1536  # bench offload's decode batch on its model's MLP


def pair_contention(seconds: float = 0.1, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Each kind of work's speed beside each other kind, relative to its speed alone.

    Kinds (`WORK_KINDS`), one unit each: `compute` an offload layer's MLP matmuls in fp32 on one torch
    thread (8 rows, 576 wide, 1536 inner: 10.6 MB of weights, as bench offload's decode), `seal`
    `AESGCM.encrypt_into` of 1 MiB, `open` `decrypt_into` of 1 MiB, `copy` the channel's 1 MiB byte
    copy (numpy). All release the GIL while they work. Each repeat runs every kind alone, then every
    pair (a kind beside itself too) on two threads at once, each for `seconds`, and divides each
    thread's units/s by its kind's alone; the result is the median over `repeats`. Torch's threads
    are set to 1 on each thread (as bench offload's caller).

    Returns:
        `result[a][b]`: a's speed while b runs on another thread (1: unaffected).

    Raises:
        ValueError: if `seconds` is not positive or `repeats` < 1.
    """
    if seconds <= 0 or repeats < 1:
        raise ValueError(f"need seconds > 0 and repeats >= 1, got {seconds} and {repeats}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples: dict[str, dict[str, list[float]]] = {a: {b: [] for b in WORK_KINDS} for a in WORK_KINDS}
        for _ in range(repeats):
            alone = {kind: _units_per_s([_work_unit(kind)], seconds)[0] for kind in WORK_KINDS}
            for i, a in enumerate(WORK_KINDS):
                for b in WORK_KINDS[i:]:
                    rate_a, rate_b = _units_per_s([_work_unit(a), _work_unit(b)], seconds)
                    samples[a][b].append(rate_a / alone[a])
                    samples[b][a].append(rate_b / alone[b])
    finally:
        torch.set_num_threads(threads)
    return {a: {b: round(statistics.median(samples[a][b]), 3) for b in WORK_KINDS} for a in WORK_KINDS}


def _work_unit(kind: str) -> Callable[[], None]:
    """One unit of `kind`'s work (`pair_contention`), on buffers of its own, warmed up."""
    if kind == "compute":
        x = torch.randn(_LAYER_ROWS, _LAYER_WIDTH)
        gate, up = torch.randn(_LAYER_WIDTH, _LAYER_FFN), torch.randn(_LAYER_WIDTH, _LAYER_FFN)
        down = torch.randn(_LAYER_FFN, _LAYER_WIDTH)

        def unit() -> None:
            ((x @ gate) * (x @ up)) @ down

    elif kind in ("seal", "open"):
        aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
        plain = memory_of(torch.randint(0, 256, (MIB,), dtype=torch.uint8))
        sealed = memoryview(aead.encrypt(nonce, plain, None))
        out = memoryview(bytearray(MIB + TAG_BYTES))

        def unit() -> None:
            if kind == "seal":
                aead.encrypt_into(nonce, plain, None, out)
            else:
                aead.decrypt_into(nonce, sealed, None, out[:MIB])

    elif kind == "copy":
        source = memory_of(torch.randint(0, 256, (MIB,), dtype=torch.uint8))
        target = memory_of(torch.empty(MIB, dtype=torch.uint8))

        def unit() -> None:
            copy_bytes(target, source)

    else:
        raise ValueError(f"unknown kind of work {kind!r}; expected one of {WORK_KINDS}")
    unit()
    return unit


def _units_per_s(units: list[Callable[[], None]], seconds: float) -> list[float]:
    """Each of `units` repeated on a thread of its own, all started together, for `seconds`: units/s."""
    start = threading.Barrier(len(units))
    rates = [0.0] * len(units)

    def loop(i: int) -> None:
        unit, done = units[i], 0
        torch.set_num_threads(1)  # per thread under OpenMP: a new thread would use every core
        start.wait()
        began = time.perf_counter()
        deadline = began + seconds
        while time.perf_counter() < deadline:
            unit()
            done += 1
        rates[i] = done / (time.perf_counter() - began)

    pool = [threading.Thread(target=loop, args=(i,)) for i in range(len(units))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return rates


def _parallel_scaling(single_gbps: float, threads: int) -> float:
    """Aggregate sealing rate of `threads` threads at once, in units of one thread's rate."""
    if threads < 2:
        return 1.0
    work = [_raw_aesgcm() for _ in range(threads)]
    for seal_all in work:
        seal_all()  # warm up
    pool = [threading.Thread(target=seal_all) for seal_all in work]
    start = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    aggregate = _gbps(threads * _RAW_BYTES, time.perf_counter() - start)
    return round(min(float(threads), aggregate / single_gbps), 2)


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def _median_gbps(nbytes: int, action: Callable[[], None], repeats: int) -> float:
    action()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return _gbps(nbytes, statistics.median(times))


def _transport_figures(
    kind: TransportKind, sizes_mib: list[int], repeats: int
) -> dict[str, dict[str, float]]:
    """GB/s of one transport per direction and size."""
    figures: dict[str, dict[str, float]] = {"h2d": {}, "d2h": {}}
    with Device(capacity_bytes=max(sizes_mib) * MIB) as device, make_transport(kind, device) as transport:
        for size in sizes_mib:
            host = HostBuffer(torch.randint(0, 256, (size * MIB,), dtype=torch.uint8))
            target = device.alloc(size * MIB)
            up = functools.partial(_completed, transport.h2d, host, target)
            down = functools.partial(_completed, transport.d2h, target, host)
            figures["h2d"][str(size)] = _median_gbps(size * MIB, up, repeats)
            figures["d2h"][str(size)] = _median_gbps(size * MIB, down, repeats)
            target.free()
    return figures


def _completed(transfer: Callable[..., Event], *buffers: object) -> None:
    transfer(*buffers).wait()


def _raw_aesgcm() -> Callable[[], None]:
    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    source = memory_of(torch.randint(0, 256, (_RAW_BYTES,), dtype=torch.uint8))
    out = memoryview(bytearray(MIB + TAG_BYTES))

    def seal_all() -> None:
        for start in range(0, _RAW_BYTES, MIB):
            aead.encrypt_into(nonce, source[start : start + MIB], None, out)

    return seal_all


def _raw_open() -> Callable[[], None]:
    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    sealed = memoryview(aead.encrypt(nonce, os.urandom(MIB), None))
    out = memoryview(bytearray(MIB))

    def open_all() -> None:
        for _ in range(0, _RAW_BYTES, MIB):
            aead.decrypt_into(nonce, sealed, None, out)

    return open_all


def _byte_copy() -> Callable[[], None]:
    source = memory_of(torch.randint(0, 256, (_RAW_BYTES,), dtype=torch.uint8))
    target = memory_of(torch.empty(_RAW_BYTES, dtype=torch.uint8))

    def copy_all() -> None:
        for start in range(0, _RAW_BYTES, MIB):
            copy_bytes(target[start : start + MIB], source[start : start + MIB])

    return copy_all


def _channel_seal() -> Callable[[], None]:
    """The cc sender's path alone: reserve, seal into staging, emit (copy into a slot); the slot is
    recycled at once."""
    ring = BounceRing(slot_count=2, slot_bytes=MIB + TAG_BYTES)
    host, _ = agree()
    state = {"sender": SenderChannel(host.h2d, ring)}
    source = memory_of(torch.randint(0, 256, (_RAW_BYTES,), dtype=torch.uint8))

    def seal_all() -> None:
        sender = state["sender"]
        for start in range(0, _RAW_BYTES, MIB):
            sender.send(source[start : start + MIB])
            ring.release(ring.pop().slot)

    return seal_all


def _memcpy() -> Callable[[], None]:
    source = torch.randint(0, 256, (_RAW_BYTES,), dtype=torch.uint8)
    target = torch.empty_like(source)

    def copy() -> None:
        target.copy_(source)

    return copy


def _print_table(results: dict[str, object], sizes_mib: list[int]) -> None:
    print(f"{'transport':<10}{'direction':<11}" + "".join(f"{f'{size} MiB':>12}" for size in sizes_mib))
    for kind in _KINDS:
        figures = results[kind.value]
        assert isinstance(figures, dict)
        for direction in ("h2d", "d2h"):
            cells = "".join(f"{figures[direction][str(size)]:>12.2f}" for size in sizes_mib)
            print(f"{kind.value:<10}{direction:<11}{cells}")
    raw, seal, memcpy = results["raw_aesgcm_gbps"], results["cc_seal_gbps"], results["memcpy_gbps"]
    assert isinstance(raw, float) and isinstance(seal, float) and isinstance(memcpy, float)
    print(f"\nraw AESGCM.encrypt_into, 1 core: {raw:.2f} GB/s")
    print(f"cc channel sealing, 1 core:      {seal:.2f} GB/s ({seal / raw:.2f} of raw)")
    print(f"memcpy (torch copy_):            {memcpy:.2f} GB/s")
    contention = results["contention"]
    assert isinstance(contention, dict)
    print("\nspeed beside another busy thread, relative to alone (row: the kind measured; column: beside)")
    print(f"{'':<10}" + "".join(f"{b:>9}" for b in WORK_KINDS))
    for a in WORK_KINDS:
        print(f"{a:<10}" + "".join(f"{contention[a][b]:>9.2f}" for b in WORK_KINDS))
    print("GB/s = 1e9 bytes/s, median of the repeats; figures are from this machine, which may be shared.")
