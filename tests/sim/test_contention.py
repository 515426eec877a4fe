"""The transfer benchmark's contention per pair of kinds of work (`pair_contention`), briefly."""

from __future__ import annotations

import pytest
import torch

from veil.bench.transfer import WORK_KINDS, pair_contention
from veil.sim.cores import Lane, PairSpeeds


def test_pair_factors_are_sane_and_cover_every_kind() -> None:
    threads = torch.get_num_threads()
    factors = pair_contention(seconds=0.05, repeats=3)
    assert torch.get_num_threads() == threads  # the caller's torch threads are left as they were
    assert set(WORK_KINDS) == {lane.value for lane in Lane}
    assert set(factors) == set(WORK_KINDS) and all(set(row) == set(WORK_KINDS) for row in factors.values())
    assert all(0 < f <= 1.2 for row in factors.values() for f in row.values()), factors
    PairSpeeds(2, factors)  # the model takes them as they are


def test_pair_contention_rejects_no_time() -> None:
    with pytest.raises(ValueError):
        pair_contention(seconds=0.0)
