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
from veil.privacy.words import Encoder, WordSpace


class PromptSanitizer(Protocol):
    def sanitize(self, token_ids: Sequence[int]) -> SanitizedPrompt: ...


@dataclass
class Context:
    """What every mechanism is built from; tables are built (or loaded from the cache) on first use."""

    embeddings: np.ndarray
    vocabulary: Vocabulary
    counts: Counter[int]  # token counts over the whole dataset (SanText's and CusText's vocabulary)
    encoder: Encoder  # scores whole words for the word space
    progress: ProgressFn | None = None
    run_tokens: np.ndarray | None = None  # tokens of the run's sentences: SanText+'s distances for them
    _tables: dict[CandidateSet, CandidateTable] | None = None
    _words: dict[tuple[int, bool], WordSpace] | None = None
    _santext: SanTextPlus | None = None

    def table(self, kind: CandidateSet) -> CandidateTable:
        if self._tables is None:
            self._tables = {}
        if kind not in self._tables:
            self._tables[kind] = load_or_build(
                self.embeddings, self.vocabulary.eligible, kind=kind, k=20, progress=self.progress
            )
        return self._tables[kind]

    def words(self, *, k: int = 20, balance: bool = True) -> WordSpace:
        """The word space over wordfreq's 100,000 most frequent English words (built once, cached)."""
        if self._words is None:
            self._words = {}
        if (k, balance) not in self._words:
            from wordfreq import top_n_list

            self._words[k, balance] = WordSpace.build(
                self.vocabulary,
                self.encoder,
                word_list=top_n_list("en", 100_000),
                k=k,
                balance=balance,
                progress=self.progress,
            )
        return self._words[k, balance]

    def santext(self, *, epsilon: float, rng: np.random.Generator) -> SanTextPlus:
        """SanText+ at `epsilon`; the distances from the run's tokens are computed once per run."""
        if self._santext is None:
            self._santext = SanTextPlus(
                embeddings=self.embeddings, vocabulary=self.vocabulary, counts=self.counts, epsilon=epsilon
            )
            if self.run_tokens is not None:
                self._santext.warm(self.run_tokens)
        return self._santext.with_epsilon(epsilon, rng=rng)

    def veil(
        self,
        *,
        epsilon: float,
        rng: np.random.Generator,
        kind: CandidateSet = CandidateSet.GROUPS,
        unit: Unit = Unit.TOKEN,
        rare_only: bool = False,
        allow_top_k: bool = False,
        words: bool = False,
        k: int = 20,
        balance: bool = True,
    ) -> Sanitizer:
        detector = AnyOf([RareWords(), Patterns()]) if rare_only else NonStopwords()
        space = self.words(k=k, balance=balance) if words else None
        return Sanitizer(
            table=self.table(kind) if space is None else space.table,
            embeddings=self.embeddings,
            vocabulary=self.vocabulary,
            epsilon=epsilon,
            noise=Noise.EXPONENTIAL,
            utility=Utility.NORMALIZED,
            detector=detector,
            unit=Unit.WORD if space is not None else unit,
            rng=rng,
            allow_top_k=allow_top_k,
            words=space,
        )


@dataclass(frozen=True)
class MechanismSpec:
    name: str
    description: str
    build: Callable[[Context, float, np.random.Generator], PromptSanitizer]


MECHANISMS: tuple[MechanismSpec, ...] = (
    MechanismSpec(
        "veil-words",
        "whole-word groups K=20 in MiniLM space (greedy by word frequency, then balanced); all but stopwords",
        lambda c, e, r: c.veil(epsilon=e, rng=r, words=True),
    ),
    MechanismSpec(
        "veil-words-rare",
        "as veil-words, only rare words (zipf < 4) and patterns",
        lambda c, e, r: c.veil(epsilon=e, rng=r, words=True, rare_only=True),
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
    MechanismSpec(
        "santext+",
        "SanText+ w=0.9 p=0.3 over the dataset's tokens",
        lambda c, e, r: c.santext(epsilon=e, rng=r),
    ),
    MechanismSpec(
        "veil-groups",
        "groups K=20, permute-and-flip, normalized cosine, all but stopwords",
        lambda c, e, r: c.veil(epsilon=e, rng=r),
    ),
    MechanismSpec(
        "veil-groups-rare",
        "as veil-groups, only rare words (zipf < 4) and patterns",
        lambda c, e, r: c.veil(epsilon=e, rng=r, rare_only=True),
    ),
)

# `--quick`: the two veil-words variants and the two baselines (the token-space rows only in full runs).
QUICK_MECHANISMS = MECHANISMS[:4]
assert [m.name for m in QUICK_MECHANISMS] == ["veil-words", "veil-words-rare", "custext+", "santext+"]
