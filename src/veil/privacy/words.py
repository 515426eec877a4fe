"""The word space: candidate sets of whole words, scored with a sentence encoder.

The model's input embeddings of subword tokens are a poor semantic space: pieces of rare words land in
groups of unrelated fragments. Here the candidates are the tokenizer's *single-token words*: eligible
tokens that decode to a space and a lowercase alphabetic word of a word list (wordfreq's English list,
most frequent first). Each word gets a unit vector from a sentence encoder (all-MiniLM-L6-v2), and the
words are split into disjoint groups of k to 2k-1 (`neighbours.build_groups` over those vectors, seeds in
word-frequency order), cached under `$VEIL_CACHE/cmif`.

A flagged word of a prompt is one unit, mapped to a group deterministically from its text alone: the
candidate word itself if it is one (case-insensitive), else the candidate word closest to the encoder's
vector of its text. So the GROUPS guarantee holds unchanged: epsilon-DP between any two words mapped to
the same group; the group is revealed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from veil.privacy.neighbours import (
    CandidateSet,
    CandidateTable,
    ProgressFn,
    balance_groups,
    build_groups,
    cache_dir,
)
from veil.privacy.vocabulary import Vocabulary

WORD_FORMAT = 1
MEMO_WORDS = 100_000  # encoder vectors of words outside the list kept in memory
_WORD = re.compile(r"^ [a-z]+$")


class Encoder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), d) unit rows."""
        ...


@dataclass(frozen=True)
class WordSpace:
    """Candidate words (as token ids) with their encoder vectors and their disjoint groups.

    `vectors[v]` is the unit vector of token v's word for candidate tokens and zero elsewhere, so that
    the sanitizer scores candidates by cosine with one (V, d) matrix.
    """

    token_of: dict[str, int]  # candidate word -> its token (" word")
    words: np.ndarray  # (n,) candidate token ids, most frequent word first
    vectors: np.ndarray  # (V, d) float32
    table: CandidateTable
    encoder: Encoder
    word_vectors: np.ndarray = field(init=False, repr=False)  # (n, d): vectors[words], gathered once
    _memo: dict[str, np.ndarray] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "word_vectors", np.ascontiguousarray(self.vectors[self.words]))

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), d) unit vectors of words: a candidate's own vector, else the encoder's (memoized:
        the vector is a deterministic function of the text, so the memo changes no output)."""
        keys = [t.strip().lower() for t in texts]
        self.warm(keys)
        out = np.zeros((len(keys), self.vectors.shape[1]), dtype=np.float32)
        for i, key in enumerate(keys):
            out[i] = self.vectors[self.token_of[key]] if key in self.token_of else self._memo[key]
        return out

    def warm(self, texts: Sequence[str]) -> None:
        """Encode, in one batch, the words of `texts` that are neither candidates nor memoized."""
        unknown = list(dict.fromkeys(t.strip().lower() for t in texts))
        unknown = [k for k in unknown if k not in self.token_of and k not in self._memo]
        if not unknown:
            return
        if len(self._memo) + len(unknown) > MEMO_WORDS:
            self._memo.clear()
        self._memo.update(zip(unknown, self.encoder.encode(unknown)))

    def anchors(self, texts: Sequence[str], queries: np.ndarray) -> np.ndarray:
        """(n,) the candidate token whose group each word uses (a deterministic function of its text)."""
        keys = [t.strip().lower() for t in texts]
        out = np.array([self.token_of.get(k, -1) for k in keys], dtype=np.int64)
        outside = out < 0  # only words outside the list are compared with every candidate
        if outside.any():
            out[outside] = self.words[np.argmax(queries[outside] @ self.word_vectors.T, axis=1)]
        return out

    @classmethod
    def build(
        cls,
        vocabulary: Vocabulary,
        encoder: Encoder,
        *,
        word_list: Sequence[str],
        k: int = 20,
        balance: bool = True,
        directory: Path | None = None,
        progress: ProgressFn | None = None,
    ) -> WordSpace:
        """Candidate words are the eligible single-token words of `word_list` (most frequent first);
        their vectors and groups are loaded from the cache or built (and cached)."""
        rank = {w: i for i, w in enumerate(dict.fromkeys(word_list))}
        found = {
            text[1:]: token
            for token, text in enumerate(vocabulary.texts)
            if vocabulary.eligible[token] and _WORD.match(text) and text[1:] in rank
        }
        names = sorted(found, key=rank.__getitem__)
        words = np.array([found[w] for w in names], dtype=np.int64)
        if words.size < 2 * k:
            raise ValueError(f"only {words.size} candidate words for groups of k={k}")
        directory = directory or cache_dir()
        vector_path = directory / f"word-vectors-{_key(encoder.name, names, vocabulary.size)}.npy"
        rows = _cached(vector_path, lambda: _encode(encoder, names, progress))
        vectors = np.zeros((vocabulary.size, rows.shape[1]), dtype=np.float32)
        vectors[words] = rows
        group_path = directory / f"word-groups-k{k}-{_key(f'{encoder.name}/{k}/{balance}', names, 0)}.npy"
        sets = _cached(group_path, lambda: _groups(vectors, words, k=k, balance=balance, progress=progress))
        set_of = np.zeros(vocabulary.size, dtype=np.int64)  # non-candidate tokens are never anchors
        for index, row in enumerate(sets):
            set_of[row[row >= 0]] = index
        table = CandidateTable(CandidateSet.GROUPS, np.arange(vocabulary.size), set_of, sets)
        return cls(dict(zip(names, words.tolist())), words, vectors, table, encoder)


def _encode(encoder: Encoder, names: list[str], progress: ProgressFn | None, block: int = 2048) -> np.ndarray:
    parts = []
    for start in range(0, len(names), block):
        parts.append(encoder.encode(names[start : start + block]))
        if progress is not None:
            progress("word vectors", min(start + block, len(names)), len(names))
    return np.concatenate(parts)


def _groups(vectors: np.ndarray, words: np.ndarray, *, k: int, balance: bool, progress: ProgressFn | None):
    mask = np.zeros(vectors.shape[0], dtype=bool)
    mask[words] = True
    table = build_groups(vectors, mask, k=k, seed_order=words, progress=progress)
    return (balance_groups(vectors, table) if balance else table).sets


def _cached(path: Path, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The array at `path`, or `build()` written there atomically."""
    if path.exists():
        return np.load(path)
    array = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
    return array


def _key(label: str, names: list[str], num_tokens: int) -> str:
    h = hashlib.sha256(f"w{WORD_FORMAT}/{label}/{num_tokens}/".encode())
    h.update("\n".join(names).encode())
    return h.hexdigest()[:32]
