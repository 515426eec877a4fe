"""Attacker's prompts on the real tokenizer: non-Latin, emoji, accented and digit PII (defects 1, 9)."""

from __future__ import annotations

import numpy as np
import pytest

from veil.privacy.detect import NonStopwords, Patterns, RareWords
from veil.privacy.neighbours import CandidateSet
from veil.privacy.sanitizer import Sanitizer
from veil.privacy.vocabulary import Vocabulary

# (prompt, the PII in it): every token carrying a byte of the PII must go through the mechanism
CASES = [
    ("我叫张伟，住在北京。请问天气如何？", ["张伟", "北京"]),
    ("اسمي محمد وأسكن في القاهرة", ["محمد", "القاهرة"]),
    ("Je m'appelle Élodie Öztürk, à Zürich", ["Élodie", "Öztürk", "Zürich"]),
    ("Send it to me 👩🏽‍⚕️ at home 🇫🇷", ["👩🏽‍⚕️", "🇫🇷"]),
    ("Call me on 2025550123 tonight", ["2025550123"]),
]


@pytest.fixture(scope="module")
def vocabulary(bundled) -> Vocabulary:  # type: ignore[no-untyped-def]
    return Vocabulary.from_tokenizer(bundled.tokenizer, size=bundled.config.vocab_size)


def _flagged_tokens(vocabulary: Vocabulary, detector, ids: list[int]) -> set[int]:  # type: ignore[no-untyped-def]
    segmentation = vocabulary.segment(ids)
    flags = detector.sensitive(segmentation)
    return {p for w, f in zip(segmentation.words, flags) if f for p in range(w.start, w.end)}


def _pii_tokens(bundled, prompt: str, pii: list[str]) -> tuple[list[int], set[int]]:  # type: ignore[no-untyped-def]
    encoded = bundled.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(prompt.index(p), prompt.index(p) + len(p)) for p in pii]
    carrying = {
        i for i, (s, e) in enumerate(encoded["offset_mapping"]) if any(s < pe and ps < e for ps, pe in spans)
    }
    return encoded["input_ids"], carrying


@pytest.mark.parametrize("detector", [NonStopwords(), Patterns()], ids=["non-stopwords", "patterns"])
@pytest.mark.parametrize(("prompt", "pii"), CASES, ids=["chinese", "arabic", "accents", "emoji", "digits"])
def test_every_pii_token_is_flagged(bundled, vocabulary, detector, prompt: str, pii: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Defect 1: byte-fragment tokens decoded alone to U+FFFD and were never flagged (2 of 22 tokens)."""
    ids, carrying = _pii_tokens(bundled, prompt, pii)
    assert carrying and carrying <= _flagged_tokens(vocabulary, detector, ids)


def test_rare_words_fail_closed_on_invalid_bytes(vocabulary) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("wordfreq")
    lone_fragment = next(
        i for i, t in enumerate(vocabulary.texts) if t == "\ufffd" and not vocabulary.special[i]
    )
    assert _flagged_tokens(vocabulary, RareWords(max_zipf=0.0), [lone_fragment]) == {0}


@pytest.fixture(scope="module")
def sanitizer(bundled) -> Sanitizer:  # type: ignore[no-untyped-def]
    return Sanitizer.for_model(bundled, epsilon=0.01, rng=3)


def test_a_digit_draws_from_all_ten_digits(bundled, sanitizer: Sanitizer) -> None:  # type: ignore[no-untyped-def]
    """Defect 1: digits fell into 3 groups, so a sanitized "2" told the server it was a 2."""
    ids = bundled.tokenizer("PIN 2", add_special_tokens=False)["input_ids"]
    seen = set()
    for _ in range(300):
        out = sanitizer.sanitize(ids)
        seen.add(bundled.tokenizer.decode([out.token_ids[-1]]))
    assert seen == set("0123456789")


def test_top_k_is_charged_as_unbounded_unless_opted_in(bundled) -> None:  # type: ignore[no-untyped-def]
    """Defect 9: TOP_K was charged n * epsilon although it gives no DP bound between two tokens."""
    refused = Sanitizer.for_model(bundled, epsilon=1.0, candidates=CandidateSet.TOP_K, rng=0)
    ids = bundled.tokenizer("Alice lives in Paris", add_special_tokens=False)["input_ids"]
    assert refused.sanitize(ids).epsilon_spent == float("inf")
    assert refused.privacy_map(0) == 0.0
    allowed = Sanitizer.for_model(
        bundled, epsilon=1.0, candidates=CandidateSet.TOP_K, allow_top_k=True, rng=0
    )
    out = allowed.sanitize(ids)
    assert out.epsilon_spent == len(out.replaced_positions) * 1.0 < np.inf
