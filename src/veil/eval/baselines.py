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
        """Exact sampling from exp(-eps * d / 2) over V_S by the Gumbel-max trick, in row blocks."""
        import torch

        targets = torch.from_numpy(self._targets)
        chosen = np.empty(tokens.size, dtype=np.int64)
        for start in range(0, tokens.size, 256):
            rows = torch.from_numpy(self._embeddings[tokens[start : start + 256]])
            logits = -0.5 * self.epsilon * torch.cdist(rows, targets).numpy()
            noisy = logits + self._rng.gumbel(size=logits.shape)
            chosen[start : start + 256] = self.outputs[np.argmax(noisy, axis=1)]
        return chosen


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
