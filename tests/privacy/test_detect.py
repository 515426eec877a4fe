from __future__ import annotations

import numpy as np
import pytest

from veil.privacy.detect import AllTokens, AnyOf, NonStopwords, Patterns, RareWords
from veil.privacy.vocabulary import Vocabulary

PIECES = [
    "<s>",
    "The",
    " movie",
    " by",
    " John",
    " Smith",
    " is",
    " tep",
    "id",
    ",",
    " call",
    " 555",
    "-",
    "123",
    "4567",
    " or",
    " mail",
    " jo",
    "@",
    "ex",
    ".",
    "com",
    " 42",
    " times",
]


def segment(text_pieces: list[str]):
    special = np.zeros(len(PIECES), dtype=bool)
    special[0] = True
    vocabulary = Vocabulary(texts=PIECES, special=special, eligible=~special)
    return vocabulary.segment([PIECES.index(p) for p in text_pieces])


def flagged(detector, pieces: list[str]) -> list[str]:
    segmentation = segment(pieces)
    return [w.text for w, f in zip(segmentation.words, detector.sensitive(segmentation)) if f]


def test_tokens_are_grouped_back_into_words():
    words = segment(["The", " tep", "id", " movie", ","]).words
    assert [(w.text, w.start, w.end) for w in words] == [
        ("The", 0, 1),
        ("tepid", 1, 3),
        ("movie", 3, 4),
        (",", 4, 5),
    ]


def test_all_tokens_and_non_stopwords():
    pieces = ["The", " movie", " is", " tep", "id", ","]
    assert flagged(AllTokens(), pieces) == ["The", "movie", "is", "tepid", ","]
    assert flagged(NonStopwords(), pieces) == ["movie", "tepid"]


def test_rare_words_use_word_frequency():
    pytest.importorskip("wordfreq")
    assert flagged(RareWords(max_zipf=4.0), ["The", " movie", " is", " tep", "id"]) == ["tepid"]


def test_patterns_find_numbers_phones_emails_and_names():
    pieces = [p for p in PIECES[1:] if p not in (" is", " tep", "id")]
    found = flagged(Patterns(), pieces)
    assert found == ["John", "Smith", "555", "-", "1234567", "jo", "@", "ex", ".", "com", "42"]
    assert "The" not in found  # a capitalized sentence start is not a name


def test_any_of_is_the_union():
    pieces = ["The", " movie", " by", " John"]
    assert flagged(AnyOf([Patterns(), NonStopwords()]), pieces) == ["movie", "John"]
    with pytest.raises(ValueError):
        AnyOf([])
