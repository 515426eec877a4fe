"""Published DP text sanitizers rebuilt in veil's framework (same embeddings, vocabulary, interface).

- SanText+ (Yue et al., ACL Findings 2021): the vocabulary is the dataset's tokens; its rarest
  `sensitive_fraction` are the sensitive set V_S. A sensitive token is always replaced, any other token
  with probability `p`; the replacement is drawn from V_S with probability proportional to
  exp(-epsilon * ||E_x - E_y|| / 2). Guarantee: epsilon * d-privacy (metric local DP) per replaced token,
  P[y | x] <= exp(epsilon * ||E_x - E_x'||) * P[y | x'] -- not a pure epsilon-DP bound.
- CusText+ (Chen et al., ACL 2023): disjoint groups of K tokens by Euclidean distance, seeded in corpus
  frequency order; each token draws from its group with the exponential mechanism on the min-max
  normalized negative distance (du = 1); stopwords are kept. Guarantee: epsilon-DP between two tokens of
  one group. It is `veil.privacy.sanitizer.Sanitizer` with CusText's table, utility and detector.

Both run on model tokens, not whitespace words as published; SanText's vocabulary is restricted to the
dataset's tokens, as SanText restricts it to the dataset's words.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from veil.privacy.detect import NonStopwords
from veil.privacy.mechanisms import Noise, Utility
from veil.privacy.neighbours import CandidateSet, Metric, ProgressFn, load_or_build
from veil.privacy.sanitizer import SanitizedPrompt, Sanitizer
from veil.privacy.vocabulary import Vocabulary


def corpus_counts(sentences: Iterable[Sequence[int]]) -> Counter[int]:
    """How often each token id occurs in a tokenized corpus."""
    counts: Counter[int] = Counter()
    for ids in sentences:
        counts.update(int(t) for t in ids)
    return counts


class SanTextPlus:
    """SanText+ over model tokens (see module docstring for the guarantee)."""

    def __init__(
        self,
        *,
        embeddings: np.ndarray,
        vocabulary: Vocabulary,
        counts: Counter[int],
        epsilon: float,
        sensitive_fraction: float = 0.9,
        p: float = 0.3,
        rng: np.random.Generator | int | None = None,
    ) -> None:
        if not 0 < epsilon < float("inf"):
            raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
        if not (0 < sensitive_fraction <= 1 and 0 <= p <= 1):
            raise ValueError("sensitive_fraction must lie in (0, 1] and p in [0, 1]")
        self.epsilon, self.p = float(epsilon), float(p)
        self._special = vocabulary.special
        by_rarity = sorted((t for t in counts if not vocabulary.special[t]), key=lambda t: (counts[t], t))
        num_sensitive = max(1, round(sensitive_fraction * len(by_rarity)))
        self.sensitive = np.zeros(vocabulary.size, dtype=bool)
        self.sensitive[by_rarity[:num_sensitive]] = True
        unseen = np.ones(vocabulary.size, dtype=bool)
        unseen[list(counts)] = False
        self.sensitive[unseen & ~vocabulary.special] = True  # tokens the dataset never uses are rarest
        self.outputs = np.flatnonzero(self.sensitive & vocabulary.eligible)  # V_S, as emitted
        self._embeddings = np.asarray(embeddings, dtype=np.float32)
        self._targets = self._embeddings[self.outputs]  # (|V_S|, d), gathered once
        self._rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self._distances = _DistanceRows(self._embeddings, self._targets)

    def with_epsilon(self, epsilon: float, *, rng: np.random.Generator | int | None = None) -> SanTextPlus:
        """The same vocabulary and sensitive set at another epsilon, sharing the memoized distances
        (they do not depend on epsilon)."""
        if not 0 < epsilon < float("inf"):
            raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
        other = copy.copy(self)
        other.epsilon = float(epsilon)
        other._rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        return other

    def warm(self, tokens: Iterable[int]) -> None:
        """Compute, in blocks, the distances from `tokens` to every output (memoized; changes no output)."""
        self._distances.warm(np.fromiter((int(t) for t in tokens), dtype=np.int64))

    def privacy_map(self, num_replaced: int) -> float:
        """Sum of the per-token epsilons (each an epsilon * d-privacy guarantee)."""
        return float(num_replaced) * self.epsilon

    def sanitize(self, token_ids: Sequence[int]) -> SanitizedPrompt:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        flip = self._rng.random(ids.size) < self.p
        positions = np.flatnonzero(~self._special[ids] & (self.sensitive[ids] | flip))
        out = ids.copy()
        out[positions] = self._sample(ids[positions])
        return SanitizedPrompt(
            tuple(int(t) for t in out),
            tuple(int(p) for p in positions),
            self.privacy_map(positions.size),
            tuple((int(ids[p]),) for p in positions),
            self.epsilon,
        )

    def _sample(self, tokens: np.ndarray) -> np.ndarray:
        """Exact sampling from exp(-eps * d / 2) over V_S by the Gumbel-max trick:
        argmax_y (-eps ||E_x - E_y|| / 2 + G_y), G_y i.i.d. standard Gumbel."""
        if tokens.size == 0:
            return np.empty(0, dtype=np.int64)
        logits = -0.5 * self.epsilon * self._distances.rows(tokens)  # (n, |V_S|)
        noisy = logits + self._rng.gumbel(size=logits.shape)
        return self.outputs[np.argmax(noisy, axis=1)]


class _DistanceRows:
    """Euclidean distances from input tokens to every output token, one float32 row per distinct input,
    computed in blocks of `block` rows (a matrix product each) and kept for the life of the object."""

    def __init__(self, embeddings: np.ndarray, targets: np.ndarray, *, block: int = 512) -> None:
        self._embeddings, self._targets, self._block = embeddings, targets, block
        self._row_of = np.full(embeddings.shape[0], -1, dtype=np.int64)
        self._rows = np.empty((0, targets.shape[0]), dtype=np.float32)

    def warm(self, tokens: np.ndarray) -> None:
        import torch

        missing = np.unique(tokens[self._row_of[tokens] < 0])
        if missing.size == 0:
            return
        # float64: the matrix-product form |x|^2 + |y|^2 - 2 x.y loses a float32 distance near 0 (a token
        # and itself came out 5e-4 apart); in float64 the error is below float32 resolution.
        targets = torch.from_numpy(self._targets).double()
        parts = [
            torch.cdist(
                torch.from_numpy(self._embeddings[missing[s : s + self._block]]).double(),
                targets,
                compute_mode="use_mm_for_euclid_dist",
            )
            .float()
            .numpy()
            for s in range(0, missing.size, self._block)
        ]
        self._row_of[missing] = np.arange(missing.size) + self._rows.shape[0]
        self._rows = np.concatenate([self._rows, *parts])

    def rows(self, tokens: np.ndarray) -> np.ndarray:
        """(len(tokens), |V_S|) distances, computing the rows not seen before."""
        self.warm(tokens)
        return self._rows[self._row_of[tokens]]


def custext_plus(
    *,
    embeddings: np.ndarray,
    vocabulary: Vocabulary,
    counts: Counter[int],
    epsilon: float,
    k: int = 20,
    rng: np.random.Generator | int | None = None,
    progress: ProgressFn | None = None,
) -> Sanitizer:
    """CusText+ as a `Sanitizer`: Euclidean groups seeded by corpus frequency, normalized-distance
    exponential mechanism (Gumbel noise is exactly it), stopwords and punctuation kept."""
    seeds = np.array([t for t, _ in counts.most_common()], dtype=np.int64)
    table = load_or_build(
        embeddings,
        vocabulary.eligible,
        kind=CandidateSet.GROUPS,
        k=k,
        metric=Metric.EUCLIDEAN,
        seed_order=seeds,
        progress=progress,
    )
    return Sanitizer(
        table=table,
        embeddings=embeddings,
        vocabulary=vocabulary,
        epsilon=epsilon,
        noise=Noise.GUMBEL,
        utility=Utility.DISTANCE_NORMALIZED,
        detector=NonStopwords(),
        rng=rng,
    )
