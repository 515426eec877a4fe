"""Statistical checks of the privacy claims: each test can fail, and a broken mechanism makes it fail."""

from __future__ import annotations

import math

import numpy as np
import pytest

from veil.privacy.mechanisms import (
    Noise,
    Utility,
    exponential_mechanism_probabilities,
    noise_scale,
    report_noisy_max,
    utilities,
)
from veil.privacy.neighbours import unit_rows

stats = pytest.importorskip("scipy.stats")

GROUP = 5  # one candidate set shared by all its members
SAMPLES = 40_000  # per input
ALPHA = 1e-3  # family-wise: every interval below holds with probability >= 1 - ALPHA


def group_utilities(utility: Utility) -> np.ndarray:
    """(GROUP, GROUP) utilities of each member (row) for each candidate (column) of one group."""
    vectors = unit_rows(np.random.default_rng(5).normal(size=(GROUP, 3)))
    candidates = np.tile(np.arange(GROUP), (GROUP, 1))
    return utilities(vectors, candidates, vectors, utility)


def sample_counts(
    scores: np.ndarray, *, epsilon: float, sensitivity: float, noise: Noise, seed: int
) -> np.ndarray:
    """(inputs, candidates) output counts of SAMPLES runs per input."""
    rng = np.random.default_rng(seed)
    counts = np.zeros_like(scores, dtype=np.int64)
    for row, u in enumerate(scores):
        chosen = report_noisy_max(
            np.tile(u, (SAMPLES, 1)), epsilon=epsilon, sensitivity=sensitivity, noise=noise, rng=rng
        )
        counts[row] = np.bincount(chosen, minlength=scores.shape[1])
    return counts


def clopper_pearson(successes: np.ndarray, trials: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    lower = np.where(successes > 0, stats.beta.ppf(alpha / 2, successes, trials - successes + 1), 0.0)
    upper_tail = stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes)
    upper = np.where(successes < trials, upper_tail, 1.0)
    return lower, upper


def certified_log_ratio(counts: np.ndarray) -> float:
    """The largest log(P[y|x] / P[y|x']) over members x, x' and outputs y that the data certify: each
    ratio is bounded below by lower(P[y|x]) / upper(P[y|x']) with Bonferroni-corrected Clopper-Pearson
    intervals, so with probability >= 1 - ALPHA the true maximum is at least the returned value."""
    lower, upper = clopper_pearson(counts, SAMPLES, ALPHA / counts.size)
    ratios = lower[:, None, :] / upper[None, :, :]  # (x, x', y)
    return float(np.log(ratios.max()))


@pytest.mark.parametrize("noise", list(Noise))
@pytest.mark.parametrize("utility", [Utility.COSINE, Utility.NORMALIZED])
def test_group_members_log_ratio_stays_within_epsilon(noise, utility):
    epsilon = 1.0
    counts = sample_counts(
        group_utilities(utility), epsilon=epsilon, sensitivity=utility.sensitivity, noise=noise, seed=11
    )
    assert certified_log_ratio(counts) <= epsilon


@pytest.mark.parametrize("noise", list(Noise))
def test_the_check_catches_noise_scaled_for_the_wrong_sensitivity(noise):
    # Normalized utilities span [0, 1] but the noise is scaled as if du were 1/8: 8 * epsilon leaks.
    epsilon = 1.0
    counts = sample_counts(
        group_utilities(Utility.NORMALIZED), epsilon=epsilon, sensitivity=1 / 8, noise=noise, seed=12
    )
    assert certified_log_ratio(counts) > epsilon


def test_gumbel_noise_is_exactly_the_exponential_mechanism():
    scores = group_utilities(Utility.NORMALIZED)[:1]
    expected = exponential_mechanism_probabilities(scores, epsilon=3.0, sensitivity=1.0)[0]
    counts = sample_counts(scores, epsilon=3.0, sensitivity=1.0, noise=Noise.GUMBEL, seed=13)[0]
    assert stats.chisquare(counts, SAMPLES * expected).pvalue > ALPHA


def test_chi_square_detects_a_different_mechanism():
    # Laplace noise at the same scale is a different distribution: the same test must reject it.
    scores = group_utilities(Utility.NORMALIZED)[:1]
    expected = exponential_mechanism_probabilities(scores, epsilon=3.0, sensitivity=1.0)[0]
    counts = sample_counts(scores, epsilon=3.0, sensitivity=1.0, noise=Noise.LAPLACE, seed=14)[0]
    assert stats.chisquare(counts, SAMPLES * expected).pvalue < ALPHA


def permute_and_flip(u: np.ndarray, *, epsilon: float, sensitivity: float, rng: np.random.Generator) -> int:
    """McKenna & Sheldon's algorithm, written directly: visit candidates in random order and stop at r
    with probability exp(eps (u_r - max u) / (2 du))."""
    best = u.max()
    while True:
        for r in rng.permutation(u.size):
            if rng.random() < math.exp(epsilon * (u[r] - best) / (2 * sensitivity)):
                return int(r)


def test_exponential_noise_matches_permute_and_flip():
    scores = group_utilities(Utility.NORMALIZED)[:1]
    rng = np.random.default_rng(15)
    direct = np.bincount(
        [permute_and_flip(scores[0], epsilon=2.0, sensitivity=1.0, rng=rng) for _ in range(8000)],
        minlength=GROUP,
    )
    noisy = sample_counts(scores, epsilon=2.0, sensitivity=1.0, noise=Noise.EXPONENTIAL, seed=16)[0]
    assert stats.chi2_contingency(np.stack([direct, noisy])).pvalue > ALPHA


def test_noise_scale_is_two_sensitivities_over_epsilon():
    assert noise_scale(epsilon=0.5, sensitivity=2.0) == 8.0
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            noise_scale(epsilon=bad, sensitivity=1.0)


def test_cross_check_with_opendp_noisy_max():
    dp = pytest.importorskip("opendp.prelude")
    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.linf_distance(T=float)
    epsilon, sensitivity = 2.0, 1.0
    scale = noise_scale(epsilon=epsilon, sensitivity=sensitivity)
    measurement = dp.m.make_noisy_max(*space, dp.max_divergence(), scale=scale)
    assert measurement.map(sensitivity) == pytest.approx(epsilon)  # OpenDP's own privacy map agrees
    scores = group_utilities(Utility.NORMALIZED)[0]
    theirs = np.bincount([measurement(scores.tolist()) for _ in range(4000)], minlength=GROUP)
    ours = sample_counts(
        scores[None], epsilon=epsilon, sensitivity=sensitivity, noise=Noise.EXPONENTIAL, seed=17
    )[0]
    assert stats.chi2_contingency(np.stack([theirs, ours])).pvalue > ALPHA
