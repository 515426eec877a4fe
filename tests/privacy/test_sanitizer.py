"""The sanitizer, its neighbour tables and its privacy map, on small random embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from veil.privacy import neighbours
from veil.privacy.detect import AllTokens
from veil.privacy.mechanisms import Noise, Utility
from veil.privacy.neighbours import CandidateSet, load_or_build, unit_rows
from veil.privacy.sanitizer import Sanitizer, Unit
from veil.privacy.vocabulary import Vocabulary

V, D, K = 80, 6, 4
SPECIAL = (0, 1)
BYTES = (2, 3, 4)


def make_vocabulary() -> Vocabulary:
    texts = ["<s>", "</s>", "!", ",", "x"] + [f" w{i}" if i % 3 else f"p{i}" for i in range(5, V)]
    special = np.zeros(V, dtype=bool)
    special[list(SPECIAL)] = True
    eligible = ~special
    eligible[list(BYTES)] = False
    return Vocabulary(texts=texts, special=special, eligible=eligible)


@pytest.fixture()
def embeddings() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(V, D)).astype(np.float32)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path))
    return tmp_path


def make(embeddings: np.ndarray, kind: CandidateSet = CandidateSet.GROUPS, **kwargs) -> Sanitizer:
    vocabulary = make_vocabulary()
    table = load_or_build(embeddings, vocabulary.eligible, kind=kind, k=K)
    options = {"epsilon": 2.0, "detector": AllTokens(), "rng": 7} | kwargs
    return Sanitizer(table=table, embeddings=embeddings, vocabulary=vocabulary, **options)


def test_groups_are_disjoint_eligible_and_of_size_k_to_2k_minus_1(embeddings):
    vocabulary = make_vocabulary()
    table = load_or_build(embeddings, vocabulary.eligible, kind=CandidateSet.GROUPS, k=K)
    members = [row[row >= 0] for row in table.sets]
    flat = np.concatenate(members)
    assert sorted(flat.tolist()) == np.flatnonzero(vocabulary.eligible).tolist()  # a partition
    assert all(K <= m.size <= 2 * K - 1 for m in members)
    for token in np.flatnonzero(vocabulary.eligible):
        assert token in table.candidates(np.array([token]))[0]  # every eligible token is in its own set


def test_top_k_sets_match_brute_force_cosine(embeddings):
    vocabulary = make_vocabulary()
    table = load_or_build(embeddings, vocabulary.eligible, kind=CandidateSet.TOP_K, k=K)
    unit = unit_rows(embeddings)
    eligible = np.flatnonzero(vocabulary.eligible)
    for token in range(V):
        sims = unit[eligible] @ unit[token]
        expected = set(eligible[np.argsort(-sims)[:K]].tolist())
        assert set(table.candidates(np.array([token]))[0].tolist()) == expected


def test_tables_are_cached_under_veil_cache(embeddings, cache, monkeypatch):
    vocabulary = make_vocabulary()
    first = load_or_build(embeddings, vocabulary.eligible, kind=CandidateSet.GROUPS, k=K)
    assert list((cache / "cmif").glob("groups-*.npz"))

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt despite the cache")

    monkeypatch.setattr(neighbours, "build_groups", fail)
    again = load_or_build(embeddings, vocabulary.eligible, kind=CandidateSet.GROUPS, k=K)
    np.testing.assert_array_equal(first.sets, again.sets)
    other = embeddings.copy()
    other[5, 0] += 1.0  # a different matrix must not hit the cache
    with pytest.raises(AssertionError, match="rebuilt"):
        load_or_build(other, vocabulary.eligible, kind=CandidateSet.GROUPS, k=K)


@pytest.mark.parametrize("kind", list(CandidateSet))
@pytest.mark.parametrize("noise", list(Noise))
@pytest.mark.parametrize("utility", [Utility.COSINE, Utility.NORMALIZED])
def test_never_emits_special_or_byte_tokens_and_keeps_specials(embeddings, kind, noise, utility):
    sanitizer = make(embeddings, kind, noise=noise, utility=utility, epsilon=0.5)
    prompt = [0, 2, 3, 4, *range(5, 40), 1]
    for _ in range(20):
        out = sanitizer.sanitize(prompt)
        assert out.token_ids[0] == 0 and out.token_ids[-1] == 1
        emitted = [out.token_ids[p] for p in out.replaced_positions]
        assert not set(emitted) & {*SPECIAL, *BYTES}
        assert out.replaced_positions == tuple(range(1, len(prompt) - 1))


def test_privacy_map_and_epsilon_spent_compose_sequentially(embeddings):
    sanitizer = make(embeddings, epsilon=1.5)
    out = sanitizer.sanitize([5, 6, 0, 7])
    assert out.epsilon_spent == pytest.approx(1.5 * 3) == sanitizer.privacy_map(3)
    assert sanitizer.privacy_map(0) == 0.0
    with pytest.raises(ValueError):
        sanitizer.privacy_map(-1)
    assert sanitizer.sanitize([0, 1]).epsilon_spent == 0.0


def test_seeded_runs_are_reproducible_and_seeds_differ(embeddings):
    prompt = list(range(5, 60))
    a = make(embeddings, rng=3, epsilon=0.1).sanitize(prompt)
    b = make(embeddings, rng=3, epsilon=0.1).sanitize(prompt)
    c = make(embeddings, rng=4, epsilon=0.1).sanitize(prompt)
    assert a == b
    assert a.token_ids != c.token_ids


def test_large_epsilon_keeps_tokens_and_small_epsilon_changes_them(embeddings):
    prompt = list(range(5, 60))
    assert make(embeddings, epsilon=1e4).sanitize(prompt).token_ids == tuple(prompt)
    changed = np.mean(np.array(make(embeddings, epsilon=0.01).sanitize(prompt).token_ids) != prompt)
    assert changed > 0.5


def test_output_stays_in_the_inputs_group(embeddings):
    sanitizer = make(embeddings, epsilon=0.01)
    for token in range(5, V):
        group = set(sanitizer.table.candidates(np.array([token]))[0].tolist())
        assert sanitizer.sanitize([token]).token_ids[0] in group


def test_word_unit_replaces_a_multi_token_word_by_one_token(embeddings):
    # " w7" then "p9"... : "p" pieces start with a letter, so " w7" + "w" continuation forms one word
    vocabulary = make_vocabulary()
    continuation = next(i for i in range(5, V) if vocabulary.texts[i].startswith("p"))
    word = [7, continuation]
    assert len(vocabulary.segment(word).words) == 1
    out = make(embeddings, unit=Unit.WORD).sanitize([*word, 8])
    assert len(out.token_ids) == 2 and out.replaced_positions == (0, 1)
    assert out.epsilon_spent == pytest.approx(2 * 2.0)


@pytest.mark.parametrize("epsilon", [0, -1, float("inf"), float("nan")])
def test_rejects_bad_epsilon(embeddings, epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        make(embeddings, epsilon=epsilon)


def test_rejects_out_of_range_token_ids(embeddings):
    with pytest.raises(ValueError, match="token ids"):
        make(embeddings).sanitize([V])
