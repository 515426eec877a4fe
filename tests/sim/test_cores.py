"""Host-core sharing on the virtual clock (`veil.sim.cores`)."""

from __future__ import annotations

import pytest

from veil.sim.cores import HostCores


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
