"""What the sanitizer knows of a tokenizer's vocabulary: token texts, which tokens may be emitted, words.

A token may be emitted as a replacement ("eligible") only if it is not a special token, not a single
byte-level token (those are fragments of characters or bare punctuation bytes) and decodes on its own to
valid, non-empty text. Words are runs of tokens grouped back together: a new word starts at a token that
begins with whitespace or a non-alphanumeric character, or after a token that ends with one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Word:
    """A run of tokens that form one word (or one punctuation mark) of a prompt.

    `start` and `end` are token positions (end exclusive); `char_start`/`char_end` locate the word's
    stripped text inside `Segmentation.text`.
    """

    start: int
    end: int
    text: str
    char_start: int
    char_end: int


@dataclass(frozen=True)
class Segmentation:
    text: str  # the concatenation of the tokens' texts
    words: tuple[Word, ...]


class Vocabulary:
    """Token texts plus the special and eligible masks of one tokenizer (pure data, no tokenizer kept)."""

    def __init__(self, *, texts: Sequence[str], special: np.ndarray, eligible: np.ndarray) -> None:
        if not (len(texts) == special.shape[0] == eligible.shape[0]):
            raise ValueError("texts, special and eligible must have one entry per token")
        if np.any(eligible & special):
            raise ValueError("a special token cannot be eligible as a replacement")
        self.texts = tuple(texts)
        self.special = special.astype(bool)
        self.eligible = eligible.astype(bool)

    @property
    def size(self) -> int:
        return len(self.texts)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, size: int | None = None) -> Vocabulary:
        """Decode every token once (about a second for 49k tokens).

        `size` is the embedding matrix's row count when it differs from `len(tokenizer)`; rows the
        tokenizer does not know are treated as special (never emitted, never replaced).
        """
        num_tokens = size if size is not None else len(tokenizer)
        known = min(num_tokens, len(tokenizer))
        pieces = tokenizer.convert_ids_to_tokens(list(range(known)))
        texts = [tokenizer.decode([i]) for i in range(known)] + [""] * (num_tokens - known)
        special = np.ones(num_tokens, dtype=bool)
        special[:known] = False
        special[[i for i in tokenizer.all_special_ids if i < num_tokens]] = True
        for i in getattr(tokenizer, "added_tokens_decoder", {}):
            if i < num_tokens:
                special[i] = True
        eligible = ~special.copy()
        for i in range(known):
            single_byte = isinstance(pieces[i], str) and len(pieces[i]) == 1
            if single_byte or not texts[i].strip() or "\ufffd" in texts[i]:
                eligible[i] = False
        return cls(texts=texts, special=special, eligible=eligible)

    def segment(self, token_ids: Sequence[int]) -> Segmentation:
        """Group tokens back into words (punctuation marks are words of their own)."""
        texts = [self.texts[t] for t in token_ids]
        words: list[Word] = []
        offset, start, start_char = 0, 0, 0
        for pos, piece in enumerate(texts):
            if pos > 0 and _starts_word(texts[pos - 1], piece):
                words.append(_word(texts, start, pos, start_char))
                start, start_char = pos, offset
            offset += len(piece)
        if texts:
            words.append(_word(texts, start, len(texts), start_char))
        return Segmentation(text="".join(texts), words=tuple(words))


def _starts_word(previous: str, piece: str) -> bool:
    if not piece or not previous:
        return True
    return not (piece[0].isalnum() and previous[-1].isalnum())


def _word(texts: list[str], start: int, end: int, start_char: int) -> Word:
    raw = "".join(texts[start:end])
    lead = len(raw) - len(raw.lstrip())
    stripped = raw.strip()
    return Word(start, end, stripped, start_char + lead, start_char + lead + len(stripped))
