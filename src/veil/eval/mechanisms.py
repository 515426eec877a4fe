"""The sanitizers compared by `veil eval privacy`, built on one model's embeddings and vocabulary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from veil.eval.baselines import SanTextPlus, custext_plus
from veil.privacy.detect import AnyOf, NonStopwords, Patterns, RareWords
from veil.privacy.mechanisms import Noise, Utility
from veil.privacy.neighbours import CandidateSet, CandidateTable, ProgressFn, load_or_build
from veil.privacy.sanitizer import SanitizedPrompt, Sanitizer, Unit
from veil.privacy.vocabulary import Vocabulary


class PromptSanitizer(Protocol):
    def sanitize(self, token_ids: Sequence[int]) -> SanitizedPrompt: ...


@dataclass
class Context:
    """What every mechanism is built from; tables are built (or loaded from the cache) on first use."""

    embeddings: np.ndarray
    vocabulary: Vocabulary
    counts: Counter[int]  # token counts over the whole dataset (SanText's and CusText's vocabulary)
    progress: ProgressFn | None = None
    _tables: dict[CandidateSet, CandidateTable] | None = None

    def table(self, kind: CandidateSet) -> CandidateTable:
        if self._tables is None:
            self._tables = {}
        if kind not in self._tables:
            self._tables[kind] = load_or_build(
                self.embeddings, self.vocabulary.eligible, kind=kind, k=20, progress=self.progress
            )
        return self._tables[kind]

    def veil(
        self,
        *,
        epsilon: float,
        rng: np.random.Generator,
        kind: CandidateSet = CandidateSet.GROUPS,
        unit: Unit = Unit.TOKEN,
        rare_only: bool = False,
        allow_top_k: bool = False,
    ) -> Sanitizer:
        detector = AnyOf([RareWords(), Patterns()]) if rare_only else NonStopwords()
        return Sanitizer(
            table=self.table(kind),
            embeddings=self.embeddings,
            vocabulary=self.vocabulary,
            epsilon=epsilon,
            noise=Noise.EXPONENTIAL,
            utility=Utility.NORMALIZED,
            detector=detector,
            unit=unit,
            rng=rng,
            allow_top_k=allow_top_k,
        )


@dataclass(frozen=True)
class MechanismSpec:
    name: str
    description: str
    build: Callable[[Context, float, np.random.Generator], PromptSanitizer]


def _units(sanitizer: PromptSanitizer, ids: Sequence[int], result: SanitizedPrompt) -> list[list[int]]:
    """Original positions behind each replaced output position."""
    if isinstance(sanitizer, Sanitizer):
        return sanitizer.units(ids)
    return [[p] for p in result.replaced_positions]


def originals(sanitizer: PromptSanitizer, ids: Sequence[int], result: SanitizedPrompt) -> list[list[int]]:
    """Original token ids behind each replaced output position."""
    return [[int(ids[p]) for p in unit] for unit in _units(sanitizer, ids, result)]


MECHANISMS: tuple[MechanismSpec, ...] = (
    MechanismSpec(
        "veil-groups",
        "groups K=20, permute-and-flip, normalized cosine, all but stopwords",
        lambda c, e, r: c.veil(epsilon=e, rng=r),
    ),
    MechanismSpec(
        "veil-groups-word",
        "as veil-groups, a multi-token word replaced as one unit",
        lambda c, e, r: c.veil(epsilon=e, rng=r, unit=Unit.WORD),
    ),
    MechanismSpec(
        "veil-groups-rare",
        "as veil-groups, only rare words (zipf < 4) and patterns",
        lambda c, e, r: c.veil(epsilon=e, rng=r, rare_only=True),
    ),
    MechanismSpec(
        "veil-topk",
        "per-token top-K=20 (no DP bound between tokens; eps/sent is per neighbourhood), as veil-groups",
        # the evaluation measures the heuristic, so it opts in to the n * eps figure explicitly
        lambda c, e, r: c.veil(epsilon=e, rng=r, kind=CandidateSet.TOP_K, allow_top_k=True),
    ),
    MechanismSpec(
        "santext+",
        "SanText+ w=0.9 p=0.3 over the dataset's tokens",
        lambda c, e, r: SanTextPlus(
            embeddings=c.embeddings, vocabulary=c.vocabulary, counts=c.counts, epsilon=e, rng=r
        ),
    ),
    MechanismSpec(
        "custext+",
        "CusText+ K=20, Euclidean groups by corpus frequency, stopwords kept",
        lambda c, e, r: custext_plus(
            embeddings=c.embeddings,
            vocabulary=c.vocabulary,
            counts=c.counts,
            epsilon=e,
            rng=r,
            progress=c.progress,
        ),
    ),
)
