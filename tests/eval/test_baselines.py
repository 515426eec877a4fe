"""SanText+'s sampler (memoized distances, one Gumbel-max draw per row) against its exact distribution."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from veil.eval.baselines import SanTextPlus
from veil.privacy.vocabulary import Vocabulary

V, D = 40, 4
NUM_DRAWS = 20_000


def make_santext(epsilon: float, rng: int = 0) -> SanTextPlus:
    special = np.zeros(V, dtype=bool)
    special[0] = True
    vocabulary = Vocabulary(texts=[f" t{i}" for i in range(V)], special=special, eligible=~special)
    embeddings = np.random.default_rng(3).normal(size=(V, D)).astype(np.float32)
    counts = Counter({t: 1 + (t * 7) % 13 for t in range(1, V)})
    return SanTextPlus(embeddings=embeddings, vocabulary=vocabulary, counts=counts, epsilon=epsilon, rng=rng)


def exact(santext: SanTextPlus, token: int, epsilon: float) -> np.ndarray:
    """P[y | x] proportional to exp(-eps ||E_x - E_y|| / 2) over the outputs, in float64."""
    e = santext._embeddings.astype(np.float64)
    logits = -0.5 * epsilon * np.linalg.norm(e[santext.outputs] - e[token], axis=1)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def counts_of(santext: SanTextPlus, token: int) -> np.ndarray:
    assert santext.sensitive[token]  # always replaced: every position is one draw
    out = np.asarray(santext.sanitize(np.full(NUM_DRAWS, token)).token_ids)
    index = {int(y): i for i, y in enumerate(santext.outputs)}
    return np.bincount([index[int(y)] for y in out], minlength=santext.outputs.size)


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_sampler_matches_the_exact_distribution(epsilon):
    santext = make_santext(epsilon)
    token = int(santext.outputs[3])
    observed = counts_of(santext, token)
    assert chisquare(observed, NUM_DRAWS * exact(santext, token, epsilon)).pvalue > 1e-3


def test_the_check_catches_a_wrong_scale():
    santext = make_santext(2.0)
    token = int(santext.outputs[3])
    assert chisquare(counts_of(santext, token), NUM_DRAWS * exact(santext, token, 1.0)).pvalue < 1e-6


def test_with_epsilon_shares_distances_and_uses_its_own_epsilon():
    base = make_santext(1.0)
    base.warm(range(V))
    other = base.with_epsilon(4.0, rng=1)
    assert other._distances is base._distances and base.epsilon == 1.0
    token = int(base.outputs[5])
    assert chisquare(counts_of(other, token), NUM_DRAWS * exact(other, token, 4.0)).pvalue > 1e-3
    with pytest.raises(ValueError, match="epsilon"):
        base.with_epsilon(0.0)


def test_memoized_distances_are_the_euclidean_distances():
    santext = make_santext(1.0)
    tokens = np.array([5, 2, 5, 9])
    rows = santext._distances.rows(tokens)
    e = santext._embeddings.astype(np.float64)
    reference = np.linalg.norm(e[tokens][:, None, :] - e[santext.outputs][None], axis=2)
    np.testing.assert_allclose(rows, reference, rtol=1e-6, atol=1e-6)  # a token and itself: 0
