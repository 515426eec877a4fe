"""Host cores shared by busy lanes, on the virtual clock: work-conserving sharing in program order.

On the emulated device every lane is a host thread: the caller (issuing, sealing, computing), the copy
engine (opening and copying every message), PipeLLM's sealing workers and its decryption thread. When
more of them are busy than the machine has cores, or when busy lanes compete for what cores share
(AES units of SMT siblings, caches, memory bandwidth), each runs slower than alone.

Mechanism (`HostCores`): at each virtual instant, which kinds of lane are busy (`Lane`) and how much
of the machine they use (a step function); a lane's new work runs in the capacity that is left. A
lane's work is placed once, when the replay reaches it, at the speed left beside the work already
placed there: min(1, aggregate(busy kinds + its kind) - used). Work placed earlier is not slowed by
work placed later (the replay is single-pass: end times already handed out cannot move), so this is
the scheduling that favours work in program order rather than the operating system's fair sharing;
it is work-conserving, so total busy time over a run is what the cores deliver either way.

Policy (`Sharing`: single-core speeds a set of busy lanes delivers together):
- `OneSpeed` (no pair factors measured): `aggregate(n)` is 1 for one lane, `parallel` (measured:
  what all `cores` deliver at once when each seals, in single-core units) once every core is busy,
  linear in between, whatever the lanes do.
- `PairSpeeds` (measured per pair of kinds, `veil.bench.transfer.pair_contention`): `beside[a][b]` is
  a lane of kind a's speed while one of kind b runs on another core. Each busy lane runs at its
  worst neighbour's factor, min over the other busy lanes j of beside[kind][kind_j], and the
  aggregate is their sum, times cores / lanes when there are more lanes than cores (they time-share).
  With two lanes a and b that is beside[a][b] + beside[b][a]: on the 2-core machine the pair
  measured is exactly the pair modelled; with more cores the minimum is an assumption (a lane's
  slowest neighbour bounds it; the product would count every neighbour as sharing its core).

Pure: no threads, no clock.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from veil.sim.hardware import HardwareProfile


class Lane(Enum):
    """The kind of work a lane does while busy (`veil.bench.transfer.pair_contention` measures each
    beside each)."""

    COMPUTE = "compute"  # torch compute, and the host's own code (a message's fixed cost)
    SEAL = "seal"  # AES-GCM sealing (with its copy into the bounce slot)
    OPEN = "open"  # AES-GCM opening (with its copies): the copy engine's sealed messages, decryption
    COPY = "copy"  # byte copies alone: the copy engine's plain messages


class Sharing(Protocol):
    """How much a set of busy lanes delivers together."""

    def aggregate(self, lanes: Sequence[Lane]) -> float:
        """Single-core speeds `lanes` (busy at once) deliver together."""
        ...


@dataclass(frozen=True)
class OneSpeed:
    """One measured speed for all cores busy, whatever the lanes do (see the module doc)."""

    cores: int
    parallel: float

    def aggregate(self, lanes: Sequence[Lane]) -> float:
        count = len(lanes)
        if count <= 1:
            return float(count)
        if self.cores == 1:
            return min(1.0, self.parallel)
        busy = min(count, self.cores)
        return 1.0 + (busy - 1) * (self.parallel - 1.0) / (self.cores - 1)


@dataclass(frozen=True)
class PairSpeeds:
    """Speeds measured per pair of kinds (see the module doc).

    Raises:
        ValueError: if a kind is missing from `beside` (or from one of its rows) or a factor is not
            positive.
    """

    cores: int
    beside: Mapping[str, Mapping[str, float]]  # beside[a][b]: a's speed while b runs, alone = 1

    def __post_init__(self) -> None:
        kinds = [lane.value for lane in Lane]
        for a in kinds:
            row = self.beside.get(a, {})
            if any(b not in row or not float(row[b]) > 0 for b in kinds):
                raise ValueError(f"need a positive factor for {a} beside each of {kinds}, got {dict(row)}")

    def aggregate(self, lanes: Sequence[Lane]) -> float:
        count = len(lanes)
        if count <= 1:
            return float(count)
        speeds = (
            min(float(self.beside[a.value][b.value]) for j, b in enumerate(lanes) if j != i)
            for i, a in enumerate(lanes)
        )
        return sum(speeds) * min(1.0, self.cores / count)


class HostCores:
    """`cores` host cores shared by busy lanes, each lane's speed from `sharing`.

    Args:
        cores: the machine's cores.
        parallel: aggregate speed of all cores busy at once, in single-core units (None: `cores`,
            perfect scaling). Shared or throttled cores and memory bandwidth keep it below `cores`.
            Used when `pairs` is None (`OneSpeed`).
        pairs: measured factors per pair of kinds (`PairSpeeds.beside`); None: `OneSpeed`.

    Raises:
        ValueError: if `cores` < 1, `parallel` is not positive or `pairs` lacks a factor.
    """

    def __init__(
        self,
        cores: int,
        parallel: float | None = None,
        *,
        pairs: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        if cores < 1:
            raise ValueError(f"cores must be >= 1, got {cores}")
        if parallel is not None and parallel <= 0:
            raise ValueError(f"parallel must be > 0, got {parallel}")
        self.cores = cores
        self.parallel = float(cores) if parallel is None else parallel
        self.sharing: Sharing = OneSpeed(cores, self.parallel) if pairs is None else PairSpeeds(cores, pairs)
        # Segment i covers [_times[i], _times[i + 1]) (the last one: to infinity), with the lanes
        # `_lanes[i]` busy, using `_used[i]` single-core speeds.
        self._times = [0.0]
        self._lanes: list[tuple[Lane, ...]] = [()]
        self._used = [0.0]
        self.work_s = 0.0  # total work placed (single-core seconds)

    def aggregate(self, lanes: int | Sequence[Lane]) -> float:
        """Single-core speeds the machine delivers with `lanes` busy (a count: that many compute lanes)."""
        return self.sharing.aggregate((Lane.COMPUTE,) * lanes if isinstance(lanes, int) else lanes)

    def run(self, start: float, work_s: float, lane: Lane = Lane.COMPUTE) -> float:
        """Place `work_s` single-core seconds of one `lane`'s work from `start`; returns when it ends.

        Raises:
            ValueError: if `work_s` is negative or `start` is before 0.
        """
        if work_s < 0:
            raise ValueError(f"work_s must be >= 0, got {work_s}")
        if work_s == 0:
            return start
        self.work_s += work_s
        i = self._split(start)
        t, left = start, work_s
        pieces: list[tuple[int, float]] = []  # (segment, speed) this work runs at
        while True:
            speed = max(0.0, min(1.0, self.sharing.aggregate((*self._lanes[i], lane)) - self._used[i]))
            end = self._times[i + 1] if i + 1 < len(self._times) else float("inf")
            if speed > 0 and left <= (end - t) * speed:
                finish = t + left / speed
                pieces.append((i, speed))
                break
            if speed > 0:
                left -= (end - t) * speed
                pieces.append((i, speed))
            t, i = end, i + 1
        self._split(finish)  # after every piece's segment: their indices stay valid
        for j, speed in pieces:
            self._lanes[j] = (*self._lanes[j], lane)
            self._used[j] += speed
        return finish

    def busy_lanes(self, at: float) -> int:
        """Lanes busy at virtual time `at` (>= 0)."""
        return len(self._lanes[bisect_right(self._times, at) - 1])

    def _split(self, t: float) -> int:
        """Index of the segment that starts at `t`, splitting the one containing it if needed."""
        i = bisect_right(self._times, t) - 1
        if i < 0:
            raise ValueError(f"virtual time must be >= 0, got {t}")
        if self._times[i] == t:
            return i
        self._times.insert(i + 1, t)
        self._lanes.insert(i + 1, self._lanes[i])
        self._used.insert(i + 1, self._used[i])
        return i + 1


def host_cores(hw: HardwareProfile) -> HostCores | None:
    """The shared host cores of `hw` (None: every lane has a core of its own)."""
    if hw.host_cores is None:
        return None
    return HostCores(hw.host_cores, hw.host_parallel, pairs=hw.host_pairs)
