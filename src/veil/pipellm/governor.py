"""Do no harm: decide, from measurements, whether speculation pays on this machine and workload.

Speculation moves sealing off the caller's critical path onto a worker thread. Where a core is free
that is a gain; where the worker competes with compute and the copy engine for the same cores (this
2-core emulation) it can cost more than it saves. Which one holds depends on the machine, the batch
and the model, so it is measured, not assumed.

The governor is an A/B test run online. The mechanism reports, for each stretch of host-to-device
traffic, the bytes moved and the wall time they took *including everything the caller did in
between* (compute, waiting): end-to-end seconds per byte, the only figure that captures contention.
The governor measures the modes over windows of `window_bytes`. It starts sealing in the caller, the
mode that does no harm, as the first incumbent: after half a window of settling and one measured
window it probes speculation, and it switches only to a challenger faster by a margin. After a hold
it probes the other mode again. Each probe the incumbent wins, the first one included, multiplies
the hold, by more the clearer the win (2x within 25%, 4x within 50%, 8x beyond), so a stationary
workload pays for fewer and fewer probes while a changed one is still noticed. After every switch,
half a window is discarded while the new mode settles (a pipeline refilling or draining). A probe
that is already clearly losing a quarter of the way into its window (dearer than the incumbent by
twice the margin) ends there: a loser is what most probes find, and a probe's window, spent in the
worse mode, is what exploration costs. The first probe of speculation is no exception: where
speculation clearly loses, a job pays for half a window of it settling and a quarter window of it
measured, not for a whole window with nothing to stop it.

A workload has phases that differ several-fold per byte (a long prefill, then decode steps), and a
window can be shorter than a phase, so a window of one mode compared with the window of the other
before it may compare two phases rather than two modes. A challenger therefore wins only
*bracketed*: it must beat the incumbent's windows on both sides of it. A probe that beats the
incumbent's window before it is confirmed against a new window of the incumbent measured right after
it. A win the bracket does not confirm is set aside (`overturned`) and the incumbent holds on.
Likewise a loss is bracketed by the incumbent's first window after it: the hold grows by how clearly
the challenger lost to the dearer of the incumbent's two windows, and not at all if the challenger
would have beaten the window after it by the margin (`unsettled`: the phase moved under it). One
phase change inside a bracket cannot make a loser win: whichever side of the challenger the change
falls, one of the two comparisons is within a phase.

Idle time is not a cost of either mode: a server between requests, or a benchmark running other
engines, leaves a gap before its next transfer that would count against whichever mode is measured.
A report whose seconds per byte exceed `idle_factor` times the running reference (an average of
recent reports in log space) is left out of the windows; the reference still moves with it, so a
workload whose cost really jumps that much (decode to a long prefill) is measured again after a few
reports.

What exploring costs is counted (`GovernorStats.explore_*`): every report made while the mode that
does not hold is being tried (a probe's settling and measured windows), and its seconds beyond what
the holding mode's latest figure gives for the same bytes. That is the price of doing no harm, in
seconds, for a job to set against its run time.

One verdict per phase (`PhasedGovernor`): the engine names the phase of each step before its
transfers (`Phase.PREFILL` if any batch has a prefill chunk, else `Phase.DECODE`), and each phase has
its own `Governor`, so a prefill whose compute hides the sealing can speculate while decode steps seal
in the caller. The time attribution follows the phases: at a change, the old phase's governor gets its
last report (the previous transfer's bytes, and the time from its start until the change) and the new
phase's governor resumes with no report spanning the other phase; its windows, holds and costs were
kept meanwhile. The bracket above still guards what a label does not separate (a batch that grows
within decode, the start and end of a step).

Pure: no clock, no threads; the caller measures and reports.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

_REFERENCE_REPORTS = 8  # the idle reference averages about this many recent reports


class Mode(enum.Enum):
    """Who seals host-to-device chunks."""

    SPECULATE = "speculate"  # workers seal predicted chunks ahead; the caller commits them
    SEAL_IN_CALLER = "seal-in-caller"  # the caller seals every chunk itself, as `cc` does


@dataclass(frozen=True)
class GovernorConfig:
    """Knobs of the governor.

    Attributes:
        window_bytes: host-to-device bytes per measured window.
        margin: a challenger must be this much faster (relative) to take over, speculation's first
            probe against sealing in the caller included. Adjacent windows differ by several percent
            on a shared machine: a small margin lets noise flip the modes, and each flip costs a
            settle window.
        first_hold: windows a new incumbent holds before its next probe; grows each time a probe
            loses.
        max_hold: cap on that hold.
        idle_factor: a report this many times slower per byte than the recent reference is idle
            time, left out of the windows.
        enabled: False pins SPECULATE (the governor then never switches; for experiments).
    """

    window_bytes: int = 32 << 20
    margin: float = 0.10
    first_hold: int = 8
    max_hold: int = 256
    idle_factor: float = 8.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.window_bytes < 1:
            raise ValueError(f"window_bytes must be >= 1, got {self.window_bytes}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if not 1 <= self.first_hold <= self.max_hold:
            raise ValueError("need 1 <= first_hold <= max_hold")
        if not self.idle_factor > 1.0:
            raise ValueError(f"idle_factor must be > 1, got {self.idle_factor}")


@dataclass
class GovernorStats:
    """What the governor measured and did."""

    windows: int = 0
    switches: int = 0
    probes: int = 0
    idle_reports: int = 0  # reports left out as idle time
    overturned: int = 0  # wins set aside: the challenger did not beat the incumbent's other window
    unsettled: int = 0  # losses that left the hold as it was: the challenger beat the window after it
    speculate_s_per_gib: float | None = None  # latest measured cost of each mode
    seal_in_caller_s_per_gib: float | None = None
    explore_bytes: int = 0  # bytes moved in the mode that did not hold (probes and their settling)
    explore_s: float = 0.0  # the seconds those bytes took
    explore_excess_s: float = 0.0  # those seconds minus what the holding mode's latest cost gives


class _Stage(enum.Enum):
    """Where a governor is in its cycle of windows (not to be confused with a workload's `Phase`)."""

    SETTLE = "settle"  # discard this half window (the mode just changed), then MEASURE or HOLD
    MEASURE = "measure"  # this window's cost is the mode's figure
    HOLD = "hold"  # exploit the winner


class Governor:
    """Chooses `Mode` per window from measured seconds per byte (see module docstring).

    Starts in `Mode.SEAL_IN_CALLER`; speculation is the first probe.
    """

    def __init__(self, config: GovernorConfig | None = None) -> None:
        self.config = config or GovernorConfig()
        self.stats = GovernorStats()
        self._mode = Mode.SEAL_IN_CALLER  # do no harm: the first incumbent
        self._incumbent = self._mode  # the mode that holds; `_mode` differs while a challenger is tried
        self._stage = _Stage.SETTLE
        self._after_settle = _Stage.MEASURE  # what the settle window leads to
        self._cost: dict[Mode, float] = {}
        self._hold = self.config.first_hold
        self._held_windows = 0
        self._probing = False  # the current MEASURE window is a probe of the non-incumbent
        self._challenger: Mode | None = None  # an apparent winner whose bracket window is being measured
        self._pending_growth: tuple[float, float] | None = None  # a loser's cost and the incumbent's before
        self._bytes = 0
        self._seconds = 0.0
        self._log_reference: float | None = None  # running mean of log(seconds per byte)
        self._last_h2d: tuple[float, int] | None = None  # start time and bytes of the previous h2d
        self._log_idle = math.log(self.config.idle_factor)

    @property
    def mode(self) -> Mode:
        """The mode the caller should use now."""
        return self._mode if self.config.enabled else Mode.SPECULATE

    def h2d_started(self, now: float, nbytes: int) -> Mode:
        """A host-to-device transfer of `nbytes` starts at `now` (seconds, on any one clock): reports
        the previous transfer's bytes and the time from its start until now, the caller's work in
        between included (`record`), and returns the mode for this one."""
        mode = self.pause(now)
        self._last_h2d = (now, nbytes)
        return mode

    def pause(self, now: float) -> Mode:
        """The caller stops reporting to this governor at `now`: reports the previous transfer's
        bytes and the time from its start until `now`, and forgets it, so the next `h2d_started`
        reports nothing for the time in between. Returns the mode."""
        last, self._last_h2d = self._last_h2d, None
        return self.mode if last is None else self.record(last[1], now - last[0])

    def record(self, nbytes: int, seconds: float) -> Mode:
        """Report `nbytes` moved in `seconds` of wall time under the current mode; returns the mode.

        Raises:
            ValueError: if a value is negative.
        """
        if nbytes < 0 or seconds < 0:
            raise ValueError("nbytes and seconds must be >= 0")
        if not self.config.enabled:
            return Mode.SPECULATE
        if nbytes and seconds and self._idle(math.log(seconds / nbytes)):
            self.stats.idle_reports += 1
            return self._mode
        self._bytes += nbytes
        self._seconds += seconds
        if self._mode is not self._incumbent:
            self._explored(nbytes, seconds)
        if self._bytes >= self._window_bytes() or self._probe_lost():
            self._close_window(self._seconds / self._bytes)
            self._bytes, self._seconds = 0, 0.0
        return self._mode

    def _explored(self, nbytes: int, seconds: float) -> None:
        """A report in the challenger's mode: what exploring cost beyond the incumbent's latest figure
        (negative where the challenger was cheaper)."""
        stats = self.stats
        stats.explore_bytes += nbytes
        stats.explore_s += seconds
        incumbent = self._cost.get(self._incumbent)
        if incumbent is not None:
            stats.explore_excess_s += seconds - nbytes * incumbent

    def _idle(self, log_cost: float) -> bool:
        """True if a report of this cost is idle time; moves the reference either way."""
        reference = self._log_reference
        if reference is None:
            self._log_reference = log_cost
            return False
        self._log_reference = reference + (log_cost - reference) / _REFERENCE_REPORTS
        return log_cost - reference > self._log_idle

    def _probe_lost(self) -> bool:
        """True once a probe's measurement, a quarter window or more, is clearly worse than the
        incumbent's (by twice the margin): the rest of its window need not be paid for."""
        if not self._probing or self._stage is not _Stage.MEASURE:
            return False
        if 4 * self._bytes < self.config.window_bytes:
            return False
        incumbent = self._cost[_other(self._mode)]
        return self._seconds / self._bytes > incumbent * (1 + 2 * self.config.margin)

    def _window_bytes(self) -> int:
        window = self.config.window_bytes
        return max(1, window // 2) if self._stage is _Stage.SETTLE else window

    def _close_window(self, cost: float) -> None:
        self.stats.windows += 1
        if self._stage is _Stage.SETTLE:
            self._stage = self._after_settle  # `_switch` zeroed the held windows
            return
        if self._stage is _Stage.MEASURE:
            self._measured(cost)
            return
        self._record_cost(cost)  # the incumbent's latest figure, for the next probe to beat
        if self._pending_growth is not None:
            self._settle_growth(cost)
        self._held_windows += 1
        if self._held_windows >= self._hold:
            self._probe()

    def _record_cost(self, cost: float) -> None:
        self._cost[self._mode] = cost
        gib = cost * (1 << 30)
        if self._mode is Mode.SPECULATE:
            self.stats.speculate_s_per_gib = gib
        else:
            self.stats.seal_in_caller_s_per_gib = gib

    def _beats(self, mode: Mode) -> bool:
        """True if `mode`'s latest window is cheaper than the other mode's latest by the margin."""
        return self._cost[mode] < self._cost[_other(mode)] * (1 - self.config.margin)

    def _measured(self, cost: float) -> None:
        self._record_cost(cost)
        if self._challenger is not None:  # the bracket's second window, of the incumbent
            self._bracketed(self._challenger)
            return
        if not self._probing:  # the first incumbent's first window: speculation is the first probe
            self._probe()
            return
        self._probing = False
        if self._beats(self._mode):  # against the incumbent's window before: now the one after
            self._challenger = self._mode
            self._switch(_other(self._mode), _Stage.MEASURE)
            return
        self._lost()

    def _bracketed(self, challenger: Mode) -> None:
        """The incumbent's window after the challenger is measured: the challenger wins if it beat
        both."""
        self._challenger = None
        if self._beats(challenger):
            self._hold = self.config.first_hold  # a new incumbent
            self._incumbent = challenger
            self._switch(challenger, _Stage.HOLD)
            return
        self.stats.overturned += 1
        self._begin_hold()

    def _lost(self) -> None:
        """The probe (the current mode) lost to the incumbent's window before it: back to the
        incumbent, whose first held window decides how much the hold grows."""
        incumbent = _other(self._mode)
        self._pending_growth = (self._cost[self._mode], self._cost[incumbent])
        self._switch(incumbent, _Stage.HOLD)

    def _settle_growth(self, cost: float) -> None:
        """The incumbent's first window after a loss brackets it: if the challenger would have beaten
        this window by the margin, the phase moved under it and the hold stays (`unsettled`);
        otherwise the hold grows by how clearly it lost to the dearer of the two windows."""
        assert self._pending_growth is not None
        (challenger, before), self._pending_growth = self._pending_growth, None
        if challenger < cost * (1 - self.config.margin):
            self.stats.unsettled += 1
            return
        self._hold = min(_growth(challenger / max(cost, before)) * self._hold, self.config.max_hold)

    def _probe(self) -> None:
        self.stats.probes += 1
        self._probing = True
        self._switch(_other(self._mode), _Stage.MEASURE)

    def _begin_hold(self) -> None:
        self._stage = _Stage.HOLD
        self._held_windows = 0

    def _switch(self, mode: Mode, stage: _Stage) -> None:
        """Change to `mode`: half a window settles, then `stage` (MEASURE or HOLD) begins."""
        self.stats.switches += 1
        self._mode = mode
        self._stage = _Stage.SETTLE
        self._after_settle = stage
        self._held_windows = 0


class Phase(enum.Enum):
    """What the engine's transfers are for, as it says before each step (`Transport.enter_phase`).

    Each phase has its own `Governor`: per byte of weights, a prefill step computes several times
    longer than a decode step, so the two can want different modes.
    """

    UNLABELLED = "unlabelled"  # before any phase is named (start-up uploads), or a caller that names none
    PREFILL = "prefill"  # a step whose batches include a prefill chunk (more than one token)
    DECODE = "decode"  # a step of decode chunks only


class PhasedGovernor:
    """One `Governor` per `Phase`; the current phase's decides the mode (see module docstring).

    Same calls as `Governor` (`mode`, `h2d_started`), plus `enter` to change phase. A phase's governor
    is created when the phase is first entered (so at most one per `Phase` member) and keeps its
    windows, holds and costs while other phases run.
    """

    def __init__(self, config: GovernorConfig | None = None) -> None:
        self.config = config or GovernorConfig()
        self._phase = Phase.UNLABELLED
        self._governors = {self._phase: Governor(self.config)}

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def mode(self) -> Mode:
        """The mode the current phase's governor says to use now."""
        return self._governors[self._phase].mode

    def h2d_started(self, now: float, nbytes: int) -> Mode:
        """As `Governor.h2d_started`, told to the current phase's governor."""
        return self._governors[self._phase].h2d_started(now, nbytes)

    def enter(self, phase: Phase, now: float) -> Mode:
        """Transfers from `now` on belong to `phase` (nothing changes if it is the current one).

        The old phase's governor gets its last report, the previous transfer's bytes and the time
        from its start until `now` (`Governor.pause`); `phase`'s governor resumes where it left off,
        and its first report will be of the first transfer after `now`: no report spans the other
        phase. Returns the mode for `phase`.

        Raises:
            TypeError: if `phase` is not a `Phase`.
        """
        if not isinstance(phase, Phase):
            raise TypeError(f"phase must be a Phase, not {type(phase).__name__}")
        if phase is not self._phase:
            self._governors[self._phase].pause(now)
            self._phase = phase
            self._governors.setdefault(phase, Governor(self.config))
        return self.mode

    def stats_by_phase(self) -> dict[Phase, GovernorStats]:
        """A copy of each entered phase's `GovernorStats`, in the order the phases were entered."""
        return {phase: dataclasses.replace(g.stats) for phase, g in self._governors.items()}

    def stats(self) -> GovernorStats:
        """Every phase's counters and exploration summed; the costs, which do not add up, are the
        current phase's."""
        parts = list(self._governors.values())
        current = self._governors[self._phase].stats
        return GovernorStats(
            **{name: sum(getattr(g.stats, name) for g in parts) for name in _SUMMED},
            speculate_s_per_gib=current.speculate_s_per_gib,
            seal_in_caller_s_per_gib=current.seal_in_caller_s_per_gib,
        )


_SUMMED = tuple(  # everything but the latest costs, which do not add up
    f.name for f in dataclasses.fields(GovernorStats) if not f.name.endswith("_s_per_gib")
)


def _growth(loss: float) -> int:
    """How much longer the incumbent holds after the other mode measured `loss` times its cost."""
    return 2 if loss < 1.25 else 4 if loss < 1.5 else 8


def _other(mode: Mode) -> Mode:
    return Mode.SEAL_IN_CALLER if mode is Mode.SPECULATE else Mode.SPECULATE
