"""Report-Noisy-Max over candidate sets: one token in, one candidate out, epsilon-DP within a shared set.

Every variant adds i.i.d. noise of scale `b = 2 * du / epsilon` to the utilities of one candidate set and
reports the argmax. For two inputs x, x' that draw from the *same* candidate set and a utility with
sensitivity du (|u(x, y) - u(x', y)| <= du for every candidate y), the output distributions satisfy
P[y | x] <= exp(epsilon) * P[y | x'] for every y:

- Noise.LAPLACE: Report-Noisy-Max with Laplace(2 du / eps) noise (the factor 2 because utilities are not
  monotone: all of them may move by du in either direction) is eps-DP.
- Noise.GUMBEL: argmax of u + Gumbel(2 du / eps) is distributed exactly as the exponential mechanism,
  P[y] proportional to exp(eps u(x, y) / (2 du)), which is eps-DP.
- Noise.EXPONENTIAL: argmax of u + Exponential(2 du / eps) is the permute-and-flip mechanism
  (McKenna & Sheldon 2020; Ding et al. 2021), eps-DP, never worse in expected utility than the
  exponential mechanism.

Nothing bounds the ratio for inputs whose candidate sets differ: a candidate of one set that is missing
from the other has probability zero there. Utilities (`Utility`) compare the input's embedding with each
candidate's:
- Utility.COSINE: raw cosine in [-1, 1], du = 2.
- Utility.NORMALIZED: cosine min-max normalized within the set to [0, 1], du = 1 (any two inputs'
  utilities for one candidate differ by at most 1 because both lie in [0, 1]).
- Utility.DISTANCE_NORMALIZED: CusText's score, the negative Euclidean distance min-max normalized within
  the set to [0, 1], du = 1.
"""

from __future__ import annotations

import enum

import numpy as np


class Noise(enum.Enum):
    LAPLACE = "laplace"  # Report-Noisy-Max, Laplace(2 du / eps)
    GUMBEL = "gumbel"  # exactly the exponential mechanism
    EXPONENTIAL = "exponential"  # permute-and-flip


class Utility(enum.Enum):
    COSINE = "cosine"  # raw cosine similarity, sensitivity 2
    NORMALIZED = "normalized"  # cosine min-max normalized within the candidate set, sensitivity 1
    DISTANCE_NORMALIZED = "distance-normalized"  # -Euclidean distance, min-max normalized (CusText), 1

    @property
    def sensitivity(self) -> float:
        return 2.0 if self is Utility.COSINE else 1.0

    @property
    def uses_unit_vectors(self) -> bool:
        """Cosine utilities compare unit rows; the distance utility compares raw embeddings."""
        return self is not Utility.DISTANCE_NORMALIZED


def noise_scale(*, epsilon: float, sensitivity: float) -> float:
    """The scale 2 * du / epsilon that makes every noise of `Noise` epsilon-DP (see module docstring)."""
    if not epsilon > 0 or not np.isfinite(epsilon):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
    return 2.0 * sensitivity / epsilon


def utilities(
    queries: np.ndarray, candidate_ids: np.ndarray, vectors: np.ndarray, utility: Utility
) -> np.ndarray:
    """(n, m) utilities of -1 padded candidates for (n, d) queries; padding gets -inf.

    `vectors` (and `queries`) are unit rows for the cosine utilities, raw embeddings for the distance one.
    """
    valid = candidate_ids >= 0
    rows = vectors[np.where(valid, candidate_ids, 0)]  # (n, m, d)
    if utility is Utility.DISTANCE_NORMALIZED:
        scores = -np.linalg.norm(rows - queries[:, None, :], axis=2).astype(np.float64)
    else:
        scores = np.clip(np.einsum("nmd,nd->nm", rows, queries).astype(np.float64), -1.0, 1.0)
    if utility is not Utility.COSINE:
        low = np.where(valid, scores, np.inf).min(axis=1, keepdims=True)
        high = np.where(valid, scores, -np.inf).max(axis=1, keepdims=True)
        scores = (scores - low) / np.maximum(high - low, 1e-12)
    return np.where(valid, scores, -np.inf)


def report_noisy_max(
    scores: np.ndarray, *, epsilon: float, sensitivity: float, noise: Noise, rng: np.random.Generator
) -> np.ndarray:
    """Row-wise argmax of `scores` (n, m) plus i.i.d. noise of scale 2*sensitivity/epsilon.

    Rows may be padded with -inf (never chosen). Returns the (n,) chosen column indices. Each row is an
    epsilon-DP release with respect to any other input whose utilities over the same columns differ by at
    most `sensitivity` entrywise.
    """
    scale = noise_scale(epsilon=epsilon, sensitivity=sensitivity)
    if noise is Noise.LAPLACE:
        draws = rng.laplace(0.0, scale, size=scores.shape)
    elif noise is Noise.GUMBEL:
        draws = rng.gumbel(0.0, scale, size=scores.shape)
    else:
        draws = rng.exponential(scale, size=scores.shape)
    return np.argmax(scores + draws, axis=1)


def exponential_mechanism_probabilities(
    scores: np.ndarray, *, epsilon: float, sensitivity: float
) -> np.ndarray:
    """Exact output probabilities exp(eps u / (2 du)) / Z of the exponential mechanism (rows of `scores`)."""
    logits = scores * (epsilon / (2.0 * sensitivity))
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)
