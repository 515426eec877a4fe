"""The do-no-harm governor: pure A/B decisions from reported seconds per byte, one verdict per phase."""

from __future__ import annotations

import pytest

from veil.pipellm.governor import Governor, GovernorConfig, Mode, Phase, PhasedGovernor

WINDOW = 1000


def _drive(governor: Governor, cost: dict[Mode, float], windows: int) -> list[Mode]:
    """Report `windows` windows, each at the cost per byte of the mode in force; modes used, in order."""
    used = []
    for _ in range(windows):
        mode = governor.mode
        used.append(mode)
        governor.record(WINDOW, WINDOW * cost[mode])
    return used


def test_keeps_sealing_in_the_caller_when_speculation_costs_more() -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=4, max_hold=64))
    used = _drive(governor, {Mode.SPECULATE: 1.5, Mode.SEAL_IN_CALLER: 1.0}, windows=400)
    assert used[:4] == [Mode.SEAL_IN_CALLER] * 2 + [Mode.SPECULATE] * 2  # settle, measure; the first probe
    assert used[-1] is Mode.SEAL_IN_CALLER
    speculative = used.count(Mode.SPECULATE)
    assert speculative == 2 * governor.stats.probes  # every probe, the first included, costs two windows
    # speculation loses by 1.5x each time, so the hold grows 8x per probe (4, 32, then 64 for good)
    assert 2 <= governor.stats.probes <= 8
    assert speculative / len(used) <= 0.06
    assert governor.stats.speculate_s_per_gib == pytest.approx(1.5 * (1 << 30))


def test_exploration_is_counted_against_the_holding_modes_latest_cost() -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=4, max_hold=64))
    used = _drive(governor, {Mode.SPECULATE: 1.5, Mode.SEAL_IN_CALLER: 1.0}, windows=400)
    speculative = used.count(Mode.SPECULATE)
    stats = governor.stats
    assert stats.explore_bytes == speculative * WINDOW
    assert stats.explore_s == pytest.approx(1.5 * speculative * WINDOW)
    assert stats.explore_excess_s == pytest.approx(0.5 * speculative * WINDOW)  # 1.5 against 1.0


def test_exploring_a_cheaper_mode_counts_negative_and_the_new_incumbent_is_the_reference() -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=2, max_hold=64))
    cost = {Mode.SPECULATE: 0.5, Mode.SEAL_IN_CALLER: 1.0}
    _drive(governor, cost, windows=6)  # settle, measure; the probe of speculation; the bracket
    assert governor.mode is Mode.SPECULATE  # it took over
    assert governor.stats.explore_bytes == 2 * WINDOW  # the probe's settle and window only
    assert governor.stats.explore_excess_s == pytest.approx(2 * WINDOW * (0.5 - 1.0))
    used = _drive(governor, cost, windows=5)  # settle, hold two windows, then probe the caller
    assert used[-2:] == [Mode.SEAL_IN_CALLER] * 2
    # the caller's probe now costs 1.0 against speculation's 0.5
    assert governor.stats.explore_excess_s == pytest.approx(2 * WINDOW * (0.5 - 1.0) + 2 * WINDOW * 0.5)


def test_idle_reports_are_not_exploration() -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=4, max_hold=64))
    _drive(governor, {Mode.SPECULATE: 1.5, Mode.SEAL_IN_CALLER: 1.0}, windows=2)
    assert governor.mode is Mode.SPECULATE
    governor.record(WINDOW, WINDOW * 100.0)  # a gap between requests
    assert governor.stats.idle_reports == 1 and governor.stats.explore_bytes == 0


@pytest.mark.parametrize(("loss", "hold"), [(1.15, 8), (1.3, 16), (2.0, 32)])
def test_the_first_probe_grows_the_hold_like_any_probe(loss: float, hold: int) -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=4, max_hold=64))
    cost = {Mode.SPECULATE: loss, Mode.SEAL_IN_CALLER: 1.0}
    used = _drive(governor, cost, windows=4 + 1 + hold - 1)
    # settle + measure sealing in the caller, settle + measure the probe of speculation, then settle
    # back and hold that long
    assert used == [Mode.SEAL_IN_CALLER] * 2 + [Mode.SPECULATE] * 2 + [Mode.SEAL_IN_CALLER] * hold
    assert governor.stats.probes == 1 and governor.mode is Mode.SEAL_IN_CALLER
    assert _drive(governor, cost, windows=1) == [Mode.SEAL_IN_CALLER]  # the last held window
    assert governor.stats.probes == 2 and governor.mode is Mode.SPECULATE  # the second probe begins


def test_keeps_speculating_when_it_pays() -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=4, max_hold=64))
    used = _drive(governor, {Mode.SPECULATE: 0.7, Mode.SEAL_IN_CALLER: 1.0}, windows=400)
    assert used[-1] is Mode.SPECULATE
    # the first window and the bracket of speculation's win, then two windows per later probe
    assert used.count(Mode.SEAL_IN_CALLER) == 2 + 2 * governor.stats.probes


def test_a_change_in_the_workload_is_noticed_at_the_next_probe() -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=4, max_hold=16))
    _drive(governor, {Mode.SPECULATE: 1.5, Mode.SEAL_IN_CALLER: 1.0}, windows=100)
    assert governor.mode is Mode.SEAL_IN_CALLER
    used = _drive(governor, {Mode.SPECULATE: 0.5, Mode.SEAL_IN_CALLER: 1.0}, windows=60)
    assert used[-20:].count(Mode.SPECULATE) >= 16  # probes of the loser aside


def test_a_difference_within_the_margin_does_not_flip_the_incumbent() -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=2, max_hold=8, margin=0.05))
    # the caller's window, speculation's probe, the caller's bracket window, then speculation holds
    _drive(governor, {Mode.SPECULATE: 1.0, Mode.SEAL_IN_CALLER: 1.2}, windows=8)
    assert governor.mode is Mode.SPECULATE and governor.stats.switches == 3
    probes, switches = governor.stats.probes, governor.stats.switches
    used = _drive(governor, {Mode.SPECULATE: 1.0, Mode.SEAL_IN_CALLER: 0.98}, windows=100)
    probes = governor.stats.probes - probes
    assert probes >= 3 and used.count(Mode.SEAL_IN_CALLER) <= 2 * probes and governor.stats.overturned == 0
    # every probe of the caller loses: there and back, but the last may not be back yet
    assert governor.stats.switches - switches == 2 * probes - (governor.mode is Mode.SEAL_IN_CALLER)


def test_windows_accumulate_partial_reports() -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW))
    for _ in range(4):
        governor.record(WINDOW // 10, 0.1)
    assert governor.stats.windows == 0
    governor.record(WINDOW // 10, 0.1)  # a settling window is half a window
    assert governor.stats.windows == 1
    for _ in range(9):
        governor.record(WINDOW // 10, 0.1)
    assert governor.stats.windows == 1
    governor.record(WINDOW // 10, 0.1)
    assert governor.stats.windows == 2  # the caller's first window: 0.1 s per tenth of a window
    assert governor.stats.seal_in_caller_s_per_gib == pytest.approx(1e-3 * (1 << 30))
    assert governor.stats.speculate_s_per_gib is None and governor.mode is Mode.SPECULATE  # the first probe


def test_disabled_pins_speculation() -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW, enabled=False))
    used = _drive(governor, {Mode.SPECULATE: 9.0, Mode.SEAL_IN_CALLER: 1.0}, windows=50)
    assert set(used) == {Mode.SPECULATE} and governor.stats.windows == 0
    assert governor.record(WINDOW, 1.0) is Mode.SPECULATE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_bytes": 0},
        {"margin": -0.1},
        {"margin": 1.0},
        {"first_hold": 0},
        {"first_hold": 9, "max_hold": 8},
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GovernorConfig(**kwargs)  # type: ignore[arg-type]


def test_negative_reports_are_refused() -> None:
    with pytest.raises(ValueError):
        Governor().record(-1, 0.0)


def test_speculation_must_win_by_the_margin_to_take_over_from_the_caller() -> None:
    """Do no harm: a speculation edge within the noise of adjacent windows is not taken."""
    governor = Governor(GovernorConfig(window_bytes=WINDOW, margin=0.10))
    used = _drive(governor, {Mode.SPECULATE: 0.95, Mode.SEAL_IN_CALLER: 1.0}, windows=40)
    assert used[:2] == [Mode.SEAL_IN_CALLER] * 2 and used[-1] is Mode.SEAL_IN_CALLER
    assert used.count(Mode.SPECULATE) == 2 * governor.stats.probes and governor.stats.probes >= 2
    assert governor.stats.switches == 2 * governor.stats.probes and governor.stats.overturned == 0
    clear = Governor(GovernorConfig(window_bytes=WINDOW, margin=0.10))
    used = _drive(clear, {Mode.SPECULATE: 0.8, Mode.SEAL_IN_CALLER: 1.0}, windows=40)
    assert used[-1] is Mode.SPECULATE


def test_idle_gaps_are_left_out_and_a_real_jump_in_cost_is_measured_again() -> None:
    """A server idle between requests reports one huge interval: it must not count against the mode
    being measured. A workload whose cost really jumps (decode to long prefill) is measured after a
    few reports."""
    governor = Governor(GovernorConfig(window_bytes=4 * WINDOW, first_hold=4, max_hold=64))
    cost = {Mode.SPECULATE: 1.5, Mode.SEAL_IN_CALLER: 1.0}
    for transfer in range(800):
        if transfer % 10 == 9:  # ten seconds of idle before every tenth transfer
            governor.record(WINDOW, 10_000.0 + WINDOW * cost[governor.mode])
        else:
            governor.record(WINDOW, WINDOW * cost[governor.mode])
    assert governor.stats.idle_reports == 80  # every gap, and nothing else
    assert governor.mode is Mode.SEAL_IN_CALLER and governor.stats.probes >= 2
    assert governor.stats.speculate_s_per_gib == pytest.approx(1.5 * (1 << 30))
    assert governor.stats.seal_in_caller_s_per_gib == pytest.approx(1.0 * (1 << 30))
    idle = governor.stats.idle_reports
    for _ in range(20):  # every report now 30x dearer: the first few are taken for idle time
        governor.record(WINDOW, 30.0 * WINDOW)
    assert 1 <= governor.stats.idle_reports - idle <= 6
    assert governor.stats.seal_in_caller_s_per_gib == pytest.approx(30.0 * (1 << 30))


@pytest.mark.parametrize(("loss", "reports"), [(1.5, 4 + 2), (1.15, 4 + 8)])
def test_a_clearly_losing_probe_ends_a_quarter_of_the_way_into_its_window(loss: float, reports: int) -> None:
    """Reports of an eighth of a window: a probe settles for half a window (4 reports) and measures
    for a whole one (8), unless it is dearer than the incumbent by twice the margin after a quarter."""
    governor = Governor(GovernorConfig(window_bytes=8 * WINDOW, first_hold=4, max_hold=64))
    cost = {Mode.SPECULATE: loss, Mode.SEAL_IN_CALLER: 1.0}
    used = []
    while governor.stats.probes < 3:
        used.append(governor.mode)
        governor.record(WINDOW, WINDOW * cost[governor.mode])
    assert used[: 4 + 8] == [Mode.SEAL_IN_CALLER] * (4 + 8)  # the first incumbent's settle and window
    probes = governor.stats.probes - 1  # the third has only begun
    assert used.count(Mode.SPECULATE) == probes * reports
    assert governor.stats.speculate_s_per_gib == pytest.approx(loss * (1 << 30))


def test_the_first_speculation_window_ends_early_when_clearly_losing() -> None:
    """Speculation used to come first and measure a whole window with nothing to compare it with;
    as the first probe it ends a quarter of the way in, like any clearly losing probe."""
    governor = Governor(GovernorConfig(window_bytes=8 * WINDOW, first_hold=4, max_hold=64))
    cost = {Mode.SPECULATE: 1.5, Mode.SEAL_IN_CALLER: 1.0}
    used = []
    for _ in range(4 + 8 + 4 + 2 + 4):
        used.append(governor.mode)
        governor.record(WINDOW, WINDOW * cost[governor.mode])
    # the caller settles and measures; speculation settles and measures a quarter; the caller settles
    assert used == [Mode.SEAL_IN_CALLER] * 12 + [Mode.SPECULATE] * (4 + 2) + [Mode.SEAL_IN_CALLER] * 4
    assert governor.stats.probes == 1 and governor.stats.windows == 5
    assert governor.stats.speculate_s_per_gib == pytest.approx(1.5 * (1 << 30))
    assert governor.mode is Mode.SEAL_IN_CALLER


def test_speculation_that_wins_from_the_start_takes_over_after_its_bracket() -> None:
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=2, max_hold=64))
    cost = {Mode.SPECULATE: 0.5, Mode.SEAL_IN_CALLER: 1.0}
    used = _drive(governor, cost, windows=6)
    # the caller's window, the probe of speculation, the caller's window after it (each settled first)
    assert used == [Mode.SEAL_IN_CALLER] * 2 + [Mode.SPECULATE] * 2 + [Mode.SEAL_IN_CALLER] * 2
    assert governor.mode is Mode.SPECULATE and governor.stats.probes == 1
    assert governor.stats.switches == 3 and governor.stats.overturned == 0
    assert _drive(governor, cost, windows=3) == [Mode.SPECULATE] * 3  # settle, then hold two windows
    assert governor.mode is Mode.SEAL_IN_CALLER and governor.stats.probes == 2  # a probe of the caller


def test_a_winning_probe_measures_its_whole_window_and_takes_over_once_bracketed() -> None:
    governor = Governor(GovernorConfig(window_bytes=8 * WINDOW, first_hold=2, max_hold=64))
    slow = {Mode.SPECULATE: 1.5, Mode.SEAL_IN_CALLER: 1.0}
    while governor.stats.probes < 2:  # the first probe loses; a later one meets the change
        governor.record(WINDOW, WINDOW * slow[governor.mode])
    fast = {Mode.SPECULATE: 0.5, Mode.SEAL_IN_CALLER: 1.0}  # the workload changed: speculation pays
    for _ in range(4 + 8):  # the probe settles and measures its whole window
        assert governor.mode is Mode.SPECULATE
        governor.record(WINDOW, WINDOW * fast[governor.mode])
    assert governor.stats.speculate_s_per_gib == pytest.approx(0.5 * (1 << 30))
    for _ in range(4 + 8):  # the incumbent's window after it: the bracket's other side
        assert governor.mode is Mode.SEAL_IN_CALLER
        governor.record(WINDOW, WINDOW * fast[governor.mode])
    assert governor.mode is Mode.SPECULATE and governor.stats.overturned == 0


def _report(governor: Governor, cost: dict[Mode, float], reports: int, scale: float = 1.0) -> None:
    """`reports` reports of a window each, at `scale` times the cost of the mode in force."""
    for _ in range(reports):
        governor.record(WINDOW, WINDOW * scale * cost[governor.mode])


SLOWER = {Mode.SPECULATE: 1.15, Mode.SEAL_IN_CALLER: 1.0}  # speculation 15% dearer in every phase


def test_a_probe_that_only_met_a_cheaper_phase_is_overturned() -> None:
    """A prefill (3x dearer per byte) ends as the probe begins: the probe, still 15% dearer than the
    incumbent within each phase, beats the incumbent's prefill window. The incumbent's window after
    the probe, in the same decode phase, sets the apparent win aside."""
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=2, max_hold=64))
    while governor.stats.probes < 2:  # the first window, probe and hold, all in the prefill phase
        _report(governor, SLOWER, 1, scale=3.0)
    assert governor.mode is Mode.SPECULATE  # the probe settles
    _report(governor, SLOWER, 2)  # decode from here on: settle, measure (3.45 against 1.15)
    assert governor.mode is Mode.SEAL_IN_CALLER and governor.stats.overturned == 0  # the bracket
    _report(governor, SLOWER, 2)  # settle, measure the incumbent in decode: 1.0 against 1.15
    assert governor.stats.overturned == 1 and governor.mode is Mode.SEAL_IN_CALLER
    switches = governor.stats.switches
    _report(governor, SLOWER, 2)
    assert governor.mode is Mode.SEAL_IN_CALLER and governor.stats.switches == switches  # holding


def test_the_first_probe_is_bracketed_by_a_second_caller_window() -> None:
    """Sealing in the caller is measured in a prefill 3x dearer per byte and speculation in the decode
    after it: speculation appears to win; the caller's window after it, in the same decode, shows
    speculation 15% dearer."""
    governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=2, max_hold=64))
    _report(governor, SLOWER, 2, scale=3.0)  # sealing in the caller settles and measures in the prefill
    assert governor.mode is Mode.SPECULATE and governor.stats.probes == 1
    _report(governor, SLOWER, 2)  # the probe of speculation, in decode: 1.15 against 3.0
    assert governor.mode is Mode.SEAL_IN_CALLER and governor.stats.overturned == 0  # the bracket
    _report(governor, SLOWER, 2)  # the caller in decode: 1.0 against 1.15
    assert governor.mode is Mode.SEAL_IN_CALLER and governor.stats.overturned == 1
    switches = governor.stats.switches
    _report(governor, SLOWER, 1)
    assert governor.mode is Mode.SEAL_IN_CALLER and governor.stats.switches == switches  # holding


def test_a_loss_grows_the_hold_only_if_the_incumbent_after_it_bracketed_it() -> None:
    """Two runs of probes that lose 1.5x; in one the cost per byte of both modes doubles right after
    the first probe, so that probe would have beaten the incumbent's window after it: no growth."""
    holds = []
    for jump in (1.0, 2.0):
        governor = Governor(GovernorConfig(window_bytes=WINDOW, first_hold=2, max_hold=64))
        cost = {Mode.SPECULATE: 1.5, Mode.SEAL_IN_CALLER: 1.0}
        while governor.stats.probes < 1:  # the caller's first window
            _report(governor, cost, 1)
        _report(governor, cost, 2)  # the first probe: settle, measure; it loses to the window before it
        held = 0
        while governor.stats.probes < 2:
            _report(governor, cost, 1, scale=jump)
            held += 1
        holds.append(held)
        assert governor.stats.unsettled == (1 if jump != 1.0 else 0)
    # the first probe lost 1.5x: hold 2 -> 16, unless unsettled; one settle window precedes the held
    # ones
    assert holds == [1 + 16, 1 + 2]


def test_h2d_started_reports_the_previous_transfer_and_the_time_since_it_began() -> None:
    governor = Governor(GovernorConfig(window_bytes=2 * WINDOW))
    assert governor.h2d_started(10.0, WINDOW) is Mode.SEAL_IN_CALLER  # nothing before it: nothing measured
    governor.h2d_started(10.5, 3 * WINDOW)  # the first: WINDOW bytes in 0.5 s closes the settle window
    assert governor.stats.windows == 1
    governor.h2d_started(12.0, WINDOW)  # the second: 3 * WINDOW bytes in 1.5 s, a measured window
    assert governor.stats.seal_in_caller_s_per_gib == pytest.approx(1.5 / (3 * WINDOW) * (1 << 30))


# one verdict per phase ------------------------------------------------------------------------------
PHASE_COSTS = {  # seconds per byte of each mode: speculation pays in prefill only
    Phase.PREFILL: {Mode.SPECULATE: 3.0, Mode.SEAL_IN_CALLER: 4.0},
    Phase.DECODE: {Mode.SPECULATE: 1.5, Mode.SEAL_IN_CALLER: 1.0},
}


def _alternate(h2d_started, enter, cycles: int, transfers: int) -> dict[Phase, list[Mode]]:
    """Alternate prefill and decode, `transfers` transfers of a quarter window each per phase, on a
    synthetic clock: a transfer takes its bytes times the cost of the mode it was given. Returns the
    modes given in each phase, in order."""
    used: dict[Phase, list[Mode]] = {phase: [] for phase in PHASE_COSTS}
    now = 0.0
    for _ in range(cycles):
        for phase, cost in PHASE_COSTS.items():
            enter(phase, now)
            for _ in range(transfers):
                mode = h2d_started(now, WINDOW // 4)
                used[phase].append(mode)
                now += WINDOW // 4 * cost[mode]
    return used


BEST = {Phase.PREFILL: Mode.SPECULATE, Phase.DECODE: Mode.SEAL_IN_CALLER}


def _best_share(used: dict[Phase, list[Mode]]) -> dict[Phase, float]:
    """Per phase, the share of its transfers in the second half of the run (after learning) that
    were given the mode cheaper in that phase."""
    late = {phase: modes[len(modes) // 2 :] for phase, modes in used.items()}
    return {phase: modes.count(BEST[phase]) / len(modes) for phase, modes in late.items()}


@pytest.mark.parametrize("transfers", [4, 8, 16])
def test_each_phase_keeps_its_own_verdict_where_one_shared_governor_cannot(transfers: int) -> None:
    """Prefill and decode alternate every 1, 2 or 4 windows; speculation is 25% cheaper in prefill
    and 50% dearer in decode. The phased governor speculates in prefill and seals in the caller in
    decode; one governor told the same transfers (today's sealer) gives about half of them the wrong
    mode."""
    config = GovernorConfig(window_bytes=WINDOW, first_hold=4, max_hold=64)
    phased = PhasedGovernor(config)
    used = _alternate(phased.h2d_started, phased.enter, cycles=60, transfers=transfers)
    best = _best_share(used)
    assert min(best.values()) > 0.95, best
    by_phase = phased.stats_by_phase()
    assert set(by_phase) == {Phase.UNLABELLED, *PHASE_COSTS} and by_phase[Phase.UNLABELLED].windows == 0
    for phase, cost in PHASE_COSTS.items():  # each governor measured its own phase only
        stats = by_phase[phase]
        assert stats.speculate_s_per_gib == pytest.approx(cost[Mode.SPECULATE] * (1 << 30))
        assert stats.seal_in_caller_s_per_gib == pytest.approx(cost[Mode.SEAL_IN_CALLER] * (1 << 30))

    shared = Governor(config)  # the negative control
    used = _alternate(shared.h2d_started, lambda phase, now: None, cycles=60, transfers=transfers)
    best = _best_share(used)
    assert sum(best.values()) / 2 < 0.6, best


def test_the_phased_stats_sum_every_phases_exploration() -> None:
    governor = PhasedGovernor(GovernorConfig(window_bytes=WINDOW, first_hold=4, max_hold=64))
    now = 0.0
    for phase, cost in ((Phase.PREFILL, 1.5), (Phase.DECODE, 2.0)):
        governor.enter(phase, now)
        for _ in range(8):  # settle, measure, the probe's settle and its window, then back
            mode = governor.h2d_started(now, WINDOW)
            now += WINDOW * (cost if mode is Mode.SPECULATE else 1.0)
    by_phase = governor.stats_by_phase()
    total = governor.stats()
    assert by_phase[Phase.PREFILL].explore_bytes > 0 and by_phase[Phase.DECODE].explore_bytes > 0
    assert total.explore_bytes == sum(g.explore_bytes for g in by_phase.values())
    assert total.explore_excess_s == pytest.approx(sum(g.explore_excess_s for g in by_phase.values()))
    assert total.explore_excess_s > 0


def test_the_report_spanning_a_phase_change_goes_to_the_old_phase_and_none_spans_the_other() -> None:
    governor = PhasedGovernor(GovernorConfig(window_bytes=2 * WINDOW))  # settle windows of WINDOW bytes
    governor.enter(Phase.PREFILL, 0.0)
    governor.h2d_started(0.0, WINDOW)
    governor.h2d_started(1.0, 2 * WINDOW)  # WINDOW in 1 s: the prefill's settle window
    assert governor.enter(Phase.DECODE, 5.0) is Mode.SEAL_IN_CALLER  # a fresh governor's first mode
    prefill = governor.stats_by_phase()[Phase.PREFILL]  # told 2 * WINDOW in 4 s, up to the change
    assert prefill.windows == 2
    assert prefill.seal_in_caller_s_per_gib == pytest.approx(2.0 / WINDOW * (1 << 30))
    assert governor.h2d_started(9.0, WINDOW) is Mode.SEAL_IN_CALLER
    assert governor.stats_by_phase()[Phase.DECODE].windows == 0  # nothing from before 9.0 reported
    governor.h2d_started(9.5, 2 * WINDOW)  # WINDOW in 0.5 s: the decode's settle window
    assert governor.enter(Phase.PREFILL, 10.5) is Mode.SPECULATE  # the prefill's first probe resumes
    decode = governor.stats_by_phase()[Phase.DECODE]  # told 2 * WINDOW in 1 s, up to the change
    assert decode.windows == 2
    assert decode.seal_in_caller_s_per_gib == pytest.approx(0.5 / WINDOW * (1 << 30))
    assert governor.h2d_started(30.0, WINDOW) is Mode.SPECULATE  # nothing reported: 10.5-30 was not its
    governor.h2d_started(30.5, WINDOW)  # WINDOW in 0.5 s: the probe's settle window
    prefill = governor.stats_by_phase()[Phase.PREFILL]
    assert prefill.windows == 3 and prefill.idle_reports == 0 and prefill.probes == 1
    total = governor.stats()  # counters summed; costs of the current phase
    assert total.windows == 5 and total.probes == 2 and total.switches == 2
    assert total.seal_in_caller_s_per_gib == prefill.seal_in_caller_s_per_gib


def test_entering_the_current_phase_changes_nothing_and_phases_are_checked() -> None:
    governor = PhasedGovernor(GovernorConfig(window_bytes=2 * WINDOW))
    governor.h2d_started(0.0, WINDOW)
    governor.enter(Phase.UNLABELLED, 1.0)  # no change: the transfer is still the pending one
    governor.h2d_started(3.0, WINDOW)  # WINDOW in 3 s closes the settle window
    assert governor.stats().windows == 1 and governor.phase is Phase.UNLABELLED
    with pytest.raises(TypeError, match="Phase"):
        governor.enter("prefill", 4.0)  # type: ignore[arg-type]


def test_pause_reports_the_transfer_and_forgets_it() -> None:
    governor = Governor(GovernorConfig(window_bytes=2 * WINDOW))
    governor.h2d_started(0.0, WINDOW)
    governor.pause(2.0)  # WINDOW in 2 s closes the settle window
    assert governor.stats.windows == 1
    governor.h2d_started(50.0, 2 * WINDOW)  # nothing pending: 2-50 is reported to nobody
    governor.h2d_started(51.0, WINDOW)  # 2 * WINDOW in 1 s: the caller's measured window
    assert governor.stats.windows == 2 and governor.stats.idle_reports == 0
    assert governor.stats.seal_in_caller_s_per_gib == pytest.approx(0.5 / WINDOW * (1 << 30))
