"""Sensitive-token detection: which words of a prompt go through the noisy-max mechanism.

Detectors are pure policy. Each gets the prompt's decoded text and its words (found on the decoded text
of the whole prompt, see `veil.privacy.vocabulary`) and returns one flag per word; the sanitizer runs
every token of a flagged word through the mechanism and passes the others through unchanged. What is not
flagged is *not* protected: the privacy guarantee of docs/privacy.md covers flagged words only.

Every detector fails closed on what it cannot judge: a word holding U+FFFD (bytes that are not valid
UTF-8) is always flagged, and so is any non-ASCII symbol (emoji, flags). `Patterns` also flags every
word of a script without letter case (Chinese, Japanese, Arabic, Hebrew, Thai, ...), where a capital
letter cannot mark a name.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Protocol

from veil.privacy.vocabulary import Segmentation, Word

# Function words (articles, pronouns, auxiliaries, prepositions, conjunctions); written for veil.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your
    yours yourself yourselves 's 't s t d ll m re ve n't""".split()  # noqa: SIM905
)


class Detector(Protocol):
    def sensitive(self, segmentation: Segmentation) -> list[bool]:
        """One flag per word of `segmentation.words`: True means "sanitize this word"."""
        ...


def _is_word(word: Word) -> bool:
    """Content rather than punctuation: letters or digits of any script, or what `_undecidable` flags."""
    return any(ch.isalnum() for ch in word.text) or _undecidable(word)


def _undecidable(word: Word) -> bool:
    """Fail closed: invalid bytes, or a non-ASCII symbol or format character (emoji, their modifiers
    and joiners, flags); punctuation of any script is not content."""
    return any(
        ch == "\ufffd" or (not ch.isascii() and unicodedata.category(ch)[0] in "SC") for ch in word.text
    )


def _caseless(word: Word) -> bool:
    """A word in a script without letter case, where capitalization cannot reveal a name."""
    return any(ch.isalpha() and ch.lower() == ch.upper() and not ch.isascii() for ch in word.text)


class AllTokens:
    """Every word, punctuation included."""

    def sensitive(self, segmentation: Segmentation) -> list[bool]:
        return [True] * len(segmentation.words)


class NonStopwords:
    """Every word except stopwords and punctuation (CusText+'s policy)."""

    def __init__(self, stopwords: frozenset[str] = STOPWORDS) -> None:
        self._stopwords = stopwords

    def sensitive(self, segmentation: Segmentation) -> list[bool]:
        return [
            _undecidable(w) or (_is_word(w) and w.text.lower() not in self._stopwords)
            for w in segmentation.words
        ]


class RareWords:
    """Words rarer than `max_zipf` on the Zipf scale of `wordfreq` (log10 of frequency per billion words:
    3 is once per million words). Numbers and unknown strings have frequency 0 and are always rare."""

    def __init__(self, *, max_zipf: float = 4.0, language: str = "en") -> None:
        from wordfreq import zipf_frequency  # optional dependency (the `eval` extra)

        self._zipf = zipf_frequency
        self._max_zipf = max_zipf
        self._language = language

    def sensitive(self, segmentation: Segmentation) -> list[bool]:
        return [
            _undecidable(w) or (_is_word(w) and self._zipf(w.text, self._language) < self._max_zipf)
            for w in segmentation.words
        ]


_PATTERNS = (
    re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),  # e-mail addresses
    re.compile(r"\+?\(?\d[\d ()-]{6,}\d"),  # phone numbers
    re.compile(r"\d+(?:[.,]\d+)*"),  # numbers
)
_SENTENCE_END = re.compile(r"[.!?]\s*$")


class Patterns:
    """Numbers, e-mail addresses, phone numbers, capitalized words that do not start a sentence (a cheap
    stand-in for names, accented capitals included), and every word of a caseless script."""

    def sensitive(self, segmentation: Segmentation) -> list[bool]:
        spans = [m.span() for p in _PATTERNS for m in p.finditer(segmentation.text)]
        flags = []
        for i, word in enumerate(segmentation.words):
            hit = any(s < word.char_end and word.char_start < e for s, e in spans)
            flags.append(hit or _undecidable(word) or _caseless(word) or _is_name(segmentation, i))
        return flags


def _is_name(segmentation: Segmentation, index: int) -> bool:
    word = segmentation.words[index]
    if not word.text[:1].isupper() or not word.text.isalpha() or word.text == "I":
        return False
    before = segmentation.text[: word.char_start]
    return bool(before.strip()) and not _SENTENCE_END.search(before)


class AnyOf:
    """The union of several detectors' flags."""

    def __init__(self, detectors: Sequence[Detector]) -> None:
        if not detectors:
            raise ValueError("AnyOf needs at least one detector")
        self._detectors = tuple(detectors)

    def sensitive(self, segmentation: Segmentation) -> list[bool]:
        flags = [d.sensitive(segmentation) for d in self._detectors]
        return [any(column) for column in zip(*flags)]
