"""The client-side prompt sanitizer of CMIF: detection (policy) then Report-Noisy-Max (mechanism).

Privacy contract. Each *unit* run through the mechanism (a token, or with `Unit.WORD` a whole multi-token
word) costs `epsilon`; a prompt with n units costs n * epsilon by sequential composition
(`privacy_map`). Per unit, with `CandidateSet.GROUPS`, the output is epsilon-DP between any two inputs
whose set is the same group (two tokens of one group, or words anchored to it); with `CandidateSet.TOP_K`
it is epsilon-DP only between inputs with identical top-K sets, which in general gives no bound at all
between two different tokens: `privacy_map` then charges infinity (an accountant refuses it) unless the
caller opts in with `allow_top_k=True`, accepting n * epsilon as a per-neighbourhood figure only.

Digits are their own candidate set: every flagged token made only of ASCII digits draws from all digit
tokens of its length (for most tokenizers the ten single digits), always one token per run, so a
replaced digit is epsilon-DP against any other digit, not only against a few of its neighbours (a phone
number's digits are each one unit). Words the detector does not flag are sent unchanged and are not
protected.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.privacy.detect import Detector, NonStopwords
from veil.privacy.mechanisms import Noise, Utility, report_noisy_max, utilities
from veil.privacy.neighbours import CandidateSet, CandidateTable, ProgressFn, load_or_build, unit_rows
from veil.privacy.vocabulary import Vocabulary
from veil.privacy.words import WordSpace


@dataclass(frozen=True)
class SanitizedPrompt:
    """A prompt after the mechanism, with what it replaced (for the user's eyes only: never sent)."""

    token_ids: tuple[int, ...]
    replaced_positions: tuple[int, ...]  # positions (in token_ids) run through the mechanism
    epsilon_spent: float
    originals: tuple[tuple[int, ...], ...] = ()  # per replaced position, the input token ids of its unit
    epsilon_per_unit: float = 0.0


class Unit(enum.Enum):
    TOKEN = "token"  # every token of a flagged word is one mechanism run
    WORD = "word"  # a flagged multi-token word is one run, replaced by one token (mean-embedding query)


class Sanitizer:
    """Replaces the flagged tokens of a prompt by Report-Noisy-Max over their candidate sets.

    Args:
        table: candidate sets (`veil.privacy.neighbours.load_or_build`).
        embeddings: the (V, d) embedding matrix the table was built from.
        vocabulary: token texts and masks of the same tokenizer.
        epsilon: privacy parameter per unit (positive, finite).
        noise, utility: the mechanism (see `veil.privacy.mechanisms`; all are epsilon-DP per unit).
        detector: which words to sanitize (default: all but stopwords and punctuation).
        unit: token-level or word-level replacement.
        rng: the only source of randomness (a Generator, or a seed for a reproducible one).
        words: the word space (`veil.privacy.words`): whole words scored with a sentence encoder, its
            groups as the table (then `table` must be `words.table` and `unit` must be `Unit.WORD`).
    """

    def __init__(
        self,
        *,
        table: CandidateTable,
        embeddings: np.ndarray,
        vocabulary: Vocabulary,
        epsilon: float,
        noise: Noise = Noise.EXPONENTIAL,
        utility: Utility = Utility.NORMALIZED,
        detector: Detector | None = None,
        unit: Unit = Unit.TOKEN,
        rng: np.random.Generator | int | None = None,
        allow_top_k: bool = False,
        words: WordSpace | None = None,
    ) -> None:
        if words is not None and (table is not words.table or unit is not Unit.WORD):
            raise ValueError("a word space needs table=words.table and unit=Unit.WORD")
        if words is not None and not utility.uses_unit_vectors:
            raise ValueError("a word space scores candidates by cosine: use a cosine utility")
        if not (isinstance(epsilon, (int, float)) and 0 < epsilon < float("inf")):
            raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
        if embeddings.shape[0] != vocabulary.size or table.set_of.shape[0] != vocabulary.size:
            raise ValueError("table, embeddings and vocabulary must cover the same number of tokens")
        self.epsilon = float(epsilon)
        self.noise, self.utility, self.unit = noise, utility, unit
        self.table, self.vocabulary = table, vocabulary
        self.detector: Detector = detector if detector is not None else NonStopwords()
        self._unit_rows = unit_rows(embeddings)
        self._vectors = self._unit_rows if utility.uses_unit_vectors else np.asarray(embeddings, np.float32)
        self.words = words
        if words is not None:
            self._vectors = words.vectors
        self._rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self.allow_top_k = allow_top_k
        self._digit_set = _digit_sets(vocabulary)

    @classmethod
    def for_model(
        cls,
        loaded: Any,
        *,
        epsilon: float,
        candidates: CandidateSet = CandidateSet.GROUPS,
        k: int = 20,
        noise: Noise = Noise.EXPONENTIAL,
        utility: Utility = Utility.NORMALIZED,
        detector: Detector | None = None,
        unit: Unit = Unit.TOKEN,
        rng: np.random.Generator | int | None = None,
        progress: ProgressFn | None = None,
        allow_top_k: bool = False,
    ) -> Sanitizer:
        """A sanitizer for a `veil.model.loader.LoadedModel` (tables cached under $VEIL_CACHE)."""
        embeddings = loaded.model.embed_tokens.weight.detach().float().cpu().numpy()
        vocabulary = Vocabulary.from_tokenizer(loaded.tokenizer, size=embeddings.shape[0])
        table = load_or_build(embeddings, vocabulary.eligible, kind=candidates, k=k, progress=progress)
        return cls(
            table=table,
            embeddings=embeddings,
            vocabulary=vocabulary,
            epsilon=epsilon,
            noise=noise,
            utility=utility,
            detector=detector,
            unit=unit,
            rng=rng,
            allow_top_k=allow_top_k,
        )

    def privacy_map(self, num_replaced: int) -> float:
        """Total epsilon of a prompt with `num_replaced` mechanism runs (sequential composition).

        Infinite for a TOP_K table without `allow_top_k`: no DP bound holds between two tokens.
        """
        if not isinstance(num_replaced, (int, np.integer)) or num_replaced < 0:
            raise ValueError(f"num_replaced must be a non-negative integer, got {num_replaced!r}")
        if num_replaced and self.table.kind is CandidateSet.TOP_K and not self.allow_top_k:
            return float("inf")
        return float(num_replaced) * self.epsilon

    def sanitize(self, token_ids: Sequence[int]) -> SanitizedPrompt:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocabulary.size):
            raise ValueError(f"token ids must lie in [0, {self.vocabulary.size})")
        units = self.units(ids)
        if not units:
            return SanitizedPrompt(tuple(int(t) for t in ids), (), 0.0)
        queries, anchors = self._queries_and_anchors(ids, units)
        candidate_ids = self._candidates(anchors)
        scores = utilities(queries, candidate_ids, self._vectors, self.utility)
        chosen = report_noisy_max(
            scores,
            epsilon=self.epsilon,
            sensitivity=self.utility.sensitivity,
            noise=self.noise,
            rng=self._rng,
        )
        outputs = candidate_ids[np.arange(len(units)), chosen]
        return self._assemble(ids, units, outputs)

    def units(self, token_ids: Sequence[int]) -> list[list[int]]:
        """Input positions of each mechanism run, in prompt order (deterministic, no randomness):
        `sanitize(ids).replaced_positions[i]` is the output of the run over `units(ids)[i]`. Special
        tokens are never replaced."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        segmentation = self.vocabulary.segment(ids.tolist())
        flags = self.detector.sensitive(segmentation)
        units: list[list[int]] = []
        for word, flagged in zip(segmentation.words, flags):
            positions = [p for p in range(word.start, word.end) if not self.vocabulary.special[ids[p]]]
            if not flagged or not positions:
                continue
            digits = [p for p in positions if self._digit_set.of[ids[p]] >= 0]
            rest = [p for p in positions if self._digit_set.of[ids[p]] < 0]
            if self.unit is Unit.WORD and rest:
                units.append(rest)
            else:
                units.extend([p] for p in rest)
            units.extend([p] for p in digits)
        return sorted(units)

    def _candidates(self, anchors: np.ndarray) -> np.ndarray:
        """Candidate ids (-1 padded) per unit: its table set, or for a digit token every digit token of
        its length."""
        table = self.table.candidates(anchors)
        digit_rows = self._digit_set.sets[np.maximum(self._digit_set.of[anchors], 0)]
        width = max(table.shape[1], digit_rows.shape[1])
        out = np.full((len(anchors), width), -1, dtype=np.int64)
        is_digit = self._digit_set.of[anchors] >= 0
        out[~is_digit, : table.shape[1]] = table[~is_digit]
        out[is_digit, : digit_rows.shape[1]] = digit_rows[is_digit]
        return out

    def _queries_and_anchors(self, ids: np.ndarray, units: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Per unit, the vector its candidates are scored against and the token whose set it uses."""
        if self.words is None:
            queries = np.stack([self._query(ids[positions]) for positions in units])
            anchors = np.array([self._anchor(ids[positions], q) for positions, q in zip(units, queries)])
            return queries, anchors
        texts = [self.vocabulary.text_of(ids[positions]) for positions in units]
        queries = self.words.queries(texts)
        anchors = self.words.anchors(texts, queries)
        digits = np.array([self._digit_set.of[ids[positions[0]]] >= 0 for positions in units])
        anchors[digits] = [ids[positions[0]] for positions, d in zip(units, digits) if d]
        return queries, anchors

    def _query(self, tokens: np.ndarray) -> np.ndarray:
        """The vector a unit is compared with: its embedding, or the mean of a word's embeddings."""
        mean = self._vectors[tokens].mean(axis=0)
        if not self.utility.uses_unit_vectors:
            return mean
        return mean / max(float(np.linalg.norm(mean)), 1e-12)

    def _anchor(self, tokens: np.ndarray, query: np.ndarray) -> int:
        """The token whose candidate set a unit uses: the token itself, or for a multi-token word the
        candidate (from its tokens' sets) most similar to the word's mean embedding."""
        if tokens.size == 1:
            return int(tokens[0])
        pool = self.table.candidates(tokens).reshape(-1)
        pool = pool[pool >= 0]
        direction = query / max(float(np.linalg.norm(query)), 1e-12)
        return int(pool[np.argmax(self._unit_rows[pool] @ direction)])

    def _assemble(self, ids: np.ndarray, units: list[list[int]], outputs: np.ndarray) -> SanitizedPrompt:
        replacement = {positions[0]: (int(out), set(positions)) for positions, out in zip(units, outputs)}
        covered = {p for positions in units for p in positions}
        out_ids: list[int] = []
        replaced: list[int] = []
        for p, token in enumerate(ids.tolist()):
            if p in replacement:
                replaced.append(len(out_ids))
                out_ids.append(replacement[p][0])
            elif p not in covered:
                out_ids.append(token)
        originals = tuple(tuple(int(ids[p]) for p in positions) for positions in units)
        return SanitizedPrompt(
            tuple(out_ids), tuple(replaced), self.privacy_map(len(units)), originals, self.privacy_map(1)
        )


@dataclass(frozen=True)
class _DigitSets:
    of: np.ndarray  # (V,) index of the digit set of each token, -1 if it is not all ASCII digits
    sets: np.ndarray  # (num_sets, max_size) token ids, -1 padded (one (1, 1) row of -1 if none)


def _digit_sets(vocabulary: Vocabulary) -> _DigitSets:
    """Non-special tokens whose bytes are only ASCII digits, one set per length."""
    by_length: dict[int, list[int]] = {}
    for token, raw in enumerate(vocabulary.token_bytes):
        if raw and raw.isdigit() and raw.isascii() and not vocabulary.special[token]:
            by_length.setdefault(len(raw), []).append(token)
    lengths = sorted(by_length)
    of = np.full(vocabulary.size, -1, dtype=np.int64)
    width = max((len(by_length[n]) for n in lengths), default=1)
    sets = np.full((max(len(lengths), 1), width), -1, dtype=np.int64)
    for index, n in enumerate(lengths):
        of[by_length[n]] = index
        sets[index, : len(by_length[n])] = by_length[n]
    return _DigitSets(of, sets)
