"""Host-core sharing on the virtual clock (`veil.sim.cores`)."""

from __future__ import annotations

import pytest

from veil.sim.cores import HostCores, Lane, PairSpeeds


def test_two_lanes_on_one_core_take_twice_as_long() -> None:
    cores = HostCores(1)
    assert cores.run(0.0, 1.0) == pytest.approx(1.0)
    assert cores.run(0.0, 1.0) == pytest.approx(2.0)
    assert cores.work_s == pytest.approx(2.0)


def test_lanes_up_to_the_core_count_run_at_full_speed_and_the_next_one_waits() -> None:
    cores = HostCores(2)
    assert [cores.run(0.0, 1.0) for _ in range(2)] == pytest.approx([1.0, 1.0])
    assert cores.busy_lanes(0.5) == 2
    assert cores.run(0.0, 1.0) == pytest.approx(2.0)  # no core free until 1.0
    assert cores.run(3.0, 0.5) == pytest.approx(3.5)  # idle again later


def test_measured_parallel_speed_limits_what_busy_cores_deliver() -> None:
    cores = HostCores(2, parallel=1.5)
    assert cores.aggregate(1) == 1.0 and cores.aggregate(2) == 1.5 and cores.aggregate(5) == 1.5
    cores.run(0.0, 1.0)
    # beside a full-speed lane the second gets 0.5 until 1.0, then the whole core: 0.5 + 0.5
    assert cores.run(0.0, 1.0) == pytest.approx(1.5)


@pytest.mark.parametrize("parallel", [0.8, 1.3, 2.0])
def test_work_is_conserved_whatever_the_order(parallel: float) -> None:
    cores = HostCores(2, parallel=parallel)
    ends = [cores.run(start, work) for start, work in [(0.0, 2.0), (0.5, 1.0), (0.2, 3.0), (1.0, 0.5)]]
    # everything is done no sooner than the machine can deliver 6.5 single-core seconds of work
    assert max(ends) >= 6.5 / max(parallel, 1.0) - 1e-9
    assert cores.work_s == pytest.approx(6.5)


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        HostCores(0)
    with pytest.raises(ValueError):
        HostCores(2, parallel=0.0)
    with pytest.raises(ValueError):
        HostCores(2).run(0.0, -1.0)


def _pairs(default: float, **pairs: float) -> dict[str, dict[str, float]]:
    """Factors `default` everywhere but `a_b=x` (a's speed beside b)."""
    kinds = [lane.value for lane in Lane]
    table = {a: dict.fromkeys(kinds, default) for a in kinds}
    for key, value in pairs.items():
        a, b = key.split("_")
        table[a][b] = value
    return table


def test_a_seal_lane_beside_compute_runs_at_what_the_pair_leaves() -> None:
    cores = HostCores(2, parallel=1.31, pairs=_pairs(1.0, compute_seal=0.9, seal_compute=0.7))
    assert cores.aggregate([Lane.COMPUTE, Lane.SEAL]) == pytest.approx(1.6)
    assert cores.run(0.0, 1.0, Lane.COMPUTE) == pytest.approx(1.0)  # alone: full speed
    # the pair delivers 0.9 + 0.7; the compute lane placed first keeps 1, the seal lane gets 0.6
    # until the compute lane ends at 1.0, then runs alone: 0.6 + 0.4
    assert cores.run(0.0, 1.0, Lane.SEAL) == pytest.approx(1.4)
    assert cores.work_s == pytest.approx(2.0)


def test_the_kind_beside_decides_the_speed() -> None:
    pairs = _pairs(1.0, seal_seal=0.6, copy_seal=0.5, seal_copy=0.5)
    beside_compute = HostCores(2, pairs=pairs)
    beside_compute.run(0.0, 10.0, Lane.COMPUTE)
    assert beside_compute.run(0.0, 1.0, Lane.SEAL) == pytest.approx(1.0)  # factors 1: no slowdown
    beside_seal = HostCores(2, pairs=pairs)
    beside_seal.run(0.0, 10.0, Lane.SEAL)
    assert beside_seal.run(0.0, 1.0, Lane.SEAL) == pytest.approx(1 / 0.2)  # 0.6 + 0.6 - 1 left


def test_more_lanes_than_cores_run_at_their_worst_neighbour_and_share_the_cores() -> None:
    sharing = PairSpeeds(2, _pairs(0.9, seal_open=0.5))
    # seal: min(0.9 beside compute, 0.5 beside open) = 0.5; open and compute: 0.9; 3 lanes on 2 cores
    assert sharing.aggregate([Lane.SEAL, Lane.OPEN, Lane.COMPUTE]) == pytest.approx((0.5 + 0.9 + 0.9) * 2 / 3)
    assert sharing.aggregate([Lane.SEAL]) == 1.0 and sharing.aggregate([]) == 0.0


@pytest.mark.parametrize("parallel", [0.8, 1.31, 2.0])
def test_without_pair_factors_every_kind_shares_one_speed(parallel: float) -> None:
    work = [(0.0, 2.0, Lane.SEAL), (0.5, 1.0, Lane.COMPUTE), (0.2, 3.0, Lane.OPEN), (1.0, 0.5, Lane.COPY)]
    kinds, counts = HostCores(2, parallel=parallel), HostCores(2, parallel=parallel)
    ends = [counts.run(start, seconds) for start, seconds, _ in work]
    assert [kinds.run(start, seconds, lane) for start, seconds, lane in work] == ends
    # on 2 cores, the same factor parallel / 2 for every pair is the same model
    uniform = HostCores(2, pairs=_pairs(parallel / 2))
    assert [uniform.run(start, seconds, lane) for start, seconds, lane in work] == pytest.approx(ends)


def test_pair_factors_must_cover_every_kind() -> None:
    with pytest.raises(ValueError):
        HostCores(2, pairs={"compute": {"compute": 0.9}})
    with pytest.raises(ValueError):
        HostCores(2, pairs=_pairs(0.0))
