"""Host cores shared by busy lanes, on the virtual clock: work-conserving sharing in program order.

On the emulated device every lane is a host thread: the caller (issuing, sealing, computing), the copy
engine (opening and copying every message), PipeLLM's sealing workers and its decryption thread. When
more of them are busy than the machine has cores, some must wait. `HostCores` keeps, at each virtual
instant, how many lanes are busy and how much of the machine they use (a step function), and runs new
work in the capacity that is left.

The machine delivers `aggregate(n)` single-core speeds with `n` busy lanes: 1 for one lane, `parallel`
(measured: what all `cores` deliver at once, in single-core units) once every core is busy, linear in
between. A lane's work is placed once, when the replay reaches it, at the speed left beside the work
already placed there: min(1, aggregate(busy + 1) - used). Work placed earlier is not slowed by work
placed later (the replay is single-pass: end times already handed out cannot move), so this is the
scheduling that favours work in program order rather than the operating system's fair sharing; it is
work-conserving, so total busy time over a run is what the cores can deliver either way.

Pure: no threads, no clock.
"""

from __future__ import annotations

from bisect import bisect_right


class HostCores:
    """`cores` host cores delivering `parallel` single-core speeds at once, shared by busy lanes.

    Args:
        cores: the machine's cores.
        parallel: aggregate speed of all cores busy at once, in single-core units (None: `cores`,
            perfect scaling). Shared or throttled cores and memory bandwidth keep it below `cores`.

    Raises:
        ValueError: if `cores` < 1 or `parallel` is not positive.
    """

    def __init__(self, cores: int, parallel: float | None = None) -> None:
        if cores < 1:
            raise ValueError(f"cores must be >= 1, got {cores}")
        if parallel is not None and parallel <= 0:
            raise ValueError(f"parallel must be > 0, got {parallel}")
        self.cores = cores
        self.parallel = float(cores) if parallel is None else parallel
        # Segment i covers [_times[i], _times[i + 1]) (the last one: to infinity), with `_lanes[i]`
        # busy lanes using `_used[i]` single-core speeds.
        self._times = [0.0]
        self._lanes = [0]
        self._used = [0.0]
        self.work_s = 0.0  # total work placed (single-core seconds)

    def aggregate(self, lanes: int) -> float:
        """Single-core speeds the machine delivers with `lanes` busy lanes."""
        if lanes <= 1:
            return float(max(lanes, 0))
        if self.cores == 1:
            return min(1.0, self.parallel)
        busy = min(lanes, self.cores)
        return 1.0 + (busy - 1) * (self.parallel - 1.0) / (self.cores - 1)

    def run(self, start: float, work_s: float) -> float:
        """Place `work_s` single-core seconds of one lane's work from `start`; returns when it ends.

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
            speed = max(0.0, min(1.0, self.aggregate(self._lanes[i] + 1) - self._used[i]))
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
            self._lanes[j] += 1
            self._used[j] += speed
        return finish

    def busy_lanes(self, at: float) -> int:
        """Lanes busy at virtual time `at` (>= 0)."""
        return self._lanes[bisect_right(self._times, at) - 1]

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
