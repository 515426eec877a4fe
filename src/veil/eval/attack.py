"""KNN inversion: what a server learns by mapping each received embedding back to the vocabulary.

For every position the mechanism produced, the attacker ranks all tokens by Euclidean distance between
their embedding and the received one, and succeeds at k if one of the unit's original tokens is among the
k nearest. The received embedding is a row of the embedding matrix, so the top-1 guess is the emitted
token itself: top-1 success equals the share of units left unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class InversionResult:
    num_units: int
    top1: float  # share of sanitized units whose original is the nearest neighbour
    top10: float  # ... among the 10 nearest neighbours


class KnnInverter:
    def __init__(self, embeddings: np.ndarray, *, k: int = 10) -> None:
        self._embeddings = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
        self._sq_norms = (self._embeddings * self._embeddings).sum(1)
        self.k = k
        self._known = np.zeros(self._embeddings.shape[0], dtype=bool)  # neighbours memoized per token
        self._near = np.zeros((self._embeddings.shape[0], k), dtype=np.int64)

    def neighbours(self, received: np.ndarray) -> np.ndarray:
        """(n, k) ids of the k nearest tokens to the embeddings of the `received` token ids."""
        received = np.asarray(received, dtype=np.int64)
        missing = np.unique(received[~self._known[received]])
        for start in range(0, missing.size, 512):
            block = missing[start : start + 512]
            rows = self._embeddings[torch.from_numpy(block)]
            dist = self._sq_norms[None, :] - 2 * rows @ self._embeddings.T  # + |row|^2, a per-row constant
            self._near[block] = dist.topk(self.k, dim=1, largest=False).indices.numpy()
            self._known[block] = True
        return self._near[received]

    def attack(self, received: Sequence[int], originals: Sequence[Sequence[int]]) -> InversionResult:
        """`received[i]` is the token sent for the unit whose original tokens are `originals[i]`."""
        if not received:
            return InversionResult(0, 0.0, 0.0)
        near = self.neighbours(np.asarray(received, dtype=np.int64))
        top1 = [near[i, 0] in set(o) for i, o in enumerate(originals)]
        top10 = [bool(set(near[i].tolist()) & set(o)) for i, o in enumerate(originals)]
        return InversionResult(len(top1), float(np.mean(top1)), float(np.mean(top10)))
