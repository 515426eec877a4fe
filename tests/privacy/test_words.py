"""The word space: candidate words, their groups, how prompt words map to them, and the epsilon bound
measured end to end through the sanitizer (members of a group and a word outside the list alike)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pytest

from veil.privacy.detect import AllTokens
from veil.privacy.neighbours import balance_groups, build_groups, unit_rows
from veil.privacy.sanitizer import Sanitizer, Unit
from veil.privacy.vocabulary import Vocabulary
from veil.privacy.words import WordSpace

stats = pytest.importorskip("scipy.stats")

K = 4
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = [f"{a}{b}" for a in LETTERS[:6] for b in LETTERS[:5]]  # 30 candidate words
OUTSIDE = ["zq", "zr", "zs", "zt"]  # eligible single-token words missing from the word list
DIGITS = [str(d) for d in range(10)]


class HashEncoder:
    """A deterministic stand-in for a sentence encoder: a unit vector seeded by the text's hash."""

    name = "hash-encoder"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        rows = [
            np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8])).normal(size=8)
            for t in texts
        ]
        out = np.array(rows, dtype=np.float32).reshape(len(texts), 8)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def make_vocabulary() -> Vocabulary:
    texts = ["<s>", "!", *[f" {w}" for w in WORDS], *[f" {w}" for w in OUTSIDE], *DIGITS, "Ab", "cd", " X"]
    special = np.zeros(len(texts), dtype=bool)
    special[0] = True
    eligible = ~special
    eligible[1] = False  # a byte token
    return Vocabulary(texts=texts, special=special, eligible=eligible)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture()
def space() -> WordSpace:
    return WordSpace.build(make_vocabulary(), HashEncoder(), word_list=[*WORDS, "unused"], k=K)


def token(text: str) -> int:
    return make_vocabulary().texts.index(text)


def sanitizer(space: WordSpace, epsilon: float, rng: int = 0) -> Sanitizer:
    vocabulary = make_vocabulary()
    embeddings = np.random.default_rng(0).normal(size=(vocabulary.size, 4)).astype(np.float32)
    return Sanitizer(
        table=space.table,
        embeddings=embeddings,
        vocabulary=vocabulary,
        epsilon=epsilon,
        detector=AllTokens(),
        unit=Unit.WORD,
        rng=rng,
        words=space,
    )


def test_candidates_are_the_listed_single_token_words_and_groups_partition_them(space):
    assert sorted(space.token_of) == sorted(WORDS)
    members = [row[row >= 0] for row in space.table.sets]
    flat = np.concatenate(members)
    assert sorted(flat.tolist()) == sorted(space.words.tolist())  # disjoint, every word exactly once
    assert all(K <= m.size <= 2 * K - 1 for m in members)
    for word, tok in space.token_of.items():
        assert tok in space.table.candidates(np.array([tok]))[0], word


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 3, 7])
def test_greedy_groups_partition_any_vocabulary(seed, k):
    rng = np.random.default_rng(seed)
    vectors = unit_rows(rng.normal(size=(97, 5)))
    eligible = rng.random(97) < 0.8
    order = rng.permutation(97)
    table = build_groups(vectors, eligible, k=k, seed_order=order, block_seeds=5)
    flat = np.concatenate([row[row >= 0] for row in table.sets])
    assert sorted(flat.tolist()) == np.flatnonzero(eligible).tolist()
    assert all(k <= (row >= 0).sum() <= 2 * k - 1 for row in table.sets)
    assert eligible[table.anchor].all()
    np.testing.assert_array_equal(table.anchor[eligible], np.flatnonzero(eligible))
    # the first seed's group is its k-1 most similar tokens (cosine), itself included
    first = int(next(t for t in order if eligible[t]))
    pool = np.flatnonzero(eligible)
    expected = set(pool[np.argsort(-(vectors[pool] @ vectors[first]))[:k]].tolist())
    assert set(table.candidates(np.array([first]))[0].tolist()) - {-1} == expected


def test_words_map_to_groups_by_their_text(space):
    texts = ["Ab", "ab", " AB ", "zq", "qq"]  # case-insensitive; outside words by their vector
    queries = space.queries(texts)
    anchors = space.anchors(texts, queries)
    assert anchors[0] == anchors[1] == anchors[2] == space.token_of["ab"]
    assert np.isin(anchors, space.words).all()
    expected = space.words[np.argmax(space.vectors[space.words] @ queries[3])]
    assert anchors[3] == expected
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, rtol=1e-5)


def test_tables_and_vectors_are_cached(space, monkeypatch):
    from veil.privacy import words

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt despite the cache")

    monkeypatch.setattr(words, "build_groups", fail)
    encoder = HashEncoder()
    again = WordSpace.build(make_vocabulary(), encoder, word_list=[*WORDS, "unused"], k=K)
    np.testing.assert_array_equal(again.table.sets, space.table.sets)
    assert encoder.calls == []


def test_emits_only_candidate_words_or_digits_one_per_word(space):
    vocabulary = make_vocabulary()
    prompt = [0, token("Ab"), token("cd"), token(" zq"), token("7"), token(" X"), token(" ab"), token("!")]
    out = sanitizer(space, epsilon=0.5).sanitize(prompt)
    # "Ab"+"cd" is one unit; "zq7" splits into its letters and its digit; "!" (a byte token) is a word
    expected = [("Ab", "cd"), (" zq",), ("7",), (" X",), (" ab",), ("!",)]
    assert [tuple(vocabulary.texts[t] for t in unit) for unit in out.originals] == expected
    emitted = [out.token_ids[p] for p in out.replaced_positions]
    digit = out.originals.index((token("7"),))
    assert emitted[digit] in {token(d) for d in DIGITS}
    assert all(e in space.words for i, e in enumerate(emitted) if i != digit)
    assert out.token_ids[0] == 0


def test_a_word_space_needs_its_table_and_word_units(space):
    vocabulary = make_vocabulary()
    embeddings = np.zeros((vocabulary.size, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"Unit\.WORD"):
        Sanitizer(table=space.table, embeddings=embeddings, vocabulary=vocabulary, epsilon=1.0, words=space)


SAMPLES = 8_000
ALPHA = 1e-3


def output_counts(space: WordSpace, text_token: int, epsilon: float, seed: int) -> np.ndarray:
    out = sanitizer(space, epsilon, rng=seed).sanitize([text_token] * SAMPLES)
    return np.bincount(np.asarray(out.token_ids), minlength=make_vocabulary().size)


def certified_log_ratio(counts: np.ndarray) -> float:
    """As in test_sanitizer_dp: the largest log ratio the samples certify with probability >= 1-ALPHA."""
    alpha = ALPHA / counts.size
    lower = np.where(counts > 0, stats.beta.ppf(alpha / 2, counts, SAMPLES - counts + 1), 0.0)
    upper = np.where(counts < SAMPLES, stats.beta.ppf(1 - alpha / 2, counts + 1, SAMPLES - counts), 1.0)
    return float(np.log((lower[:, None, :] / upper[None, :, :]).max()))


@pytest.mark.parametrize("epsilon", [1.0])
def test_words_of_one_group_stay_within_epsilon_end_to_end(space, epsilon):
    anchor = space.anchors(["zq"], space.queries(["zq"]))  # a word outside the list: by its vector
    group = space.table.candidates(anchor)[0]
    inputs = [token(" zq"), *group[group >= 0][:3].tolist()]
    counts = np.stack([output_counts(space, t, epsilon, seed=i) for i, t in enumerate(inputs)])
    members = group[group >= 0]
    assert counts[:, members].sum() == counts.sum()  # every output is a member of the group
    assert certified_log_ratio(counts[:, members]) <= epsilon
    # power: the members' output distributions do differ (the check is not vacuous)
    assert stats.chi2_contingency(counts[:, members] + 1).pvalue < ALPHA


def within_group_cosine(vectors: np.ndarray, sets: np.ndarray) -> float:
    total = 0.0
    for row in sets:
        members = vectors[row[row >= 0]]
        centroid = members.mean(axis=0)
        total += float((members @ (centroid / np.linalg.norm(centroid))).sum())
    return total


@pytest.mark.parametrize("seed", range(3))
def test_balancing_keeps_members_and_sizes_and_tightens_groups(seed):
    rng = np.random.default_rng(seed)
    vectors = unit_rows(rng.normal(size=(120, 6)))
    eligible = rng.random(120) < 0.9
    greedy = build_groups(vectors, eligible, k=5, seed_order=rng.permutation(120))
    balanced = balance_groups(vectors, greedy)
    assert sorted(balanced.sets[balanced.sets >= 0].tolist()) == np.flatnonzero(eligible).tolist()
    np.testing.assert_array_equal((balanced.sets >= 0).sum(1), (greedy.sets >= 0).sum(1))
    for token in np.flatnonzero(eligible):
        assert token in balanced.candidates(np.array([token]))[0]
    assert within_group_cosine(vectors, balanced.sets) >= within_group_cosine(vectors, greedy.sets)
