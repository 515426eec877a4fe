"""The benchmarks' confidence interval for a median."""

from __future__ import annotations

import random

import pytest

from veil.bench.report import median_interval


def test_the_interval_uses_the_order_statistics_the_binomial_tail_allows() -> None:
    # n = 6: only [min, max] reaches 95% (1 - 2/64 = 96.9%); n = 12: the 3rd and 10th (96.1%)
    assert median_interval([5, 1, 4, 2, 6, 3]) == (1, 6)
    assert median_interval(list(range(12, 0, -1))) == (3, 10)
    assert median_interval(list(range(12)), confidence=0.5) == (4, 7)  # 1 - 2 P(B <= 4) = 61.2%


def test_too_few_values_give_no_interval() -> None:
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # [min, max] covers 93.8% < 95%
    assert median_interval([]) is None


def test_the_interval_covers_the_median_as_often_as_it_claims() -> None:
    # Skewed, heavy-tailed draws (like a shared machine's slow rounds): the 95% interval of 12 draws
    # must hold the true median in about 96.1% of trials (its exact coverage), not far fewer.
    rng = random.Random(7)
    true_median = 1.0  # lognormal(0, 0.3) has median e^0 = 1
    trials = 4000
    covered = 0
    for _ in range(trials):
        draws = [rng.lognormvariate(0.0, 0.3) for _ in range(12)]
        low, high = median_interval(draws) or (0.0, 0.0)
        covered += low <= true_median <= high
    rate = covered / trials
    assert 0.95 <= rate <= 0.972, rate  # 0.961 +- 3 standard errors (0.003)


def test_confidence_must_be_a_probability() -> None:
    with pytest.raises(ValueError):
        median_interval([1.0] * 10, confidence=1.0)
