"""What the sanitizer knows of a tokenizer's vocabulary: token bytes and texts, which tokens may be
emitted, and how a prompt's tokens group into words.

A token may be emitted as a replacement ("eligible") only if it is not a special token, not a single
byte-level token (those are fragments of characters or bare punctuation bytes) and decodes on its own to
valid, non-empty text.

Words are found on the *decoded text of the whole prompt*, not token by token: a byte-level tokenizer
splits a Chinese, Arabic or accented character, or an emoji, across tokens that decode alone to
U+FFFD. `segment` decodes the tokens' bytes together (UTF-8, invalid bytes become U+FFFD), splits the
text into runs of word characters (letters and digits of any script, with combining marks) and runs of
other non-space characters (punctuation, symbols, emoji), and gives each run the tokens that carry its
bytes; runs that share a token are merged into one word.
"""

from __future__ import annotations

import codecs
import unicodedata
from collections.abc import Iterable, Sequence
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

    def __init__(
        self,
        *,
        texts: Sequence[str],
        special: np.ndarray,
        eligible: np.ndarray,
        token_bytes: Sequence[bytes] | None = None,
    ) -> None:
        """`token_bytes`: the bytes each token stands for (default: its text in UTF-8)."""
        raw = tuple(token_bytes) if token_bytes is not None else tuple(t.encode() for t in texts)
        if not (len(texts) == len(raw) == special.shape[0] == eligible.shape[0]):
            raise ValueError("texts, token_bytes, special and eligible must have one entry per token")
        if np.any(eligible & special):
            raise ValueError("a special token cannot be eligible as a replacement")
        self.texts = tuple(texts)
        self.token_bytes = raw
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
        # byte-level BPE (GPT-2's alphabet, "\u0120" for a space) or sentencepiece with byte fallback
        byte_level = any(isinstance(p, str) and p.startswith("\u0120") for p in pieces)
        decoder = _byte_decoder() if byte_level else None
        raw = [_piece_bytes(pieces[i], texts[i], decoder) for i in range(known)]
        return cls(
            texts=texts, special=special, eligible=eligible, token_bytes=raw + [b""] * (num_tokens - known)
        )

    def text_of(self, token_ids: Sequence[int]) -> str:
        """The tokens' bytes decoded together (invalid UTF-8 becomes U+FFFD), without surrounding space."""
        raw = b"".join(self.token_bytes[t] for t in token_ids if not self.special[t])
        return raw.decode("utf-8", errors="replace").strip()

    def segment(self, token_ids: Sequence[int]) -> Segmentation:
        """Group tokens into words on the decoded text of the whole prompt (see the module docstring)."""
        chars = _decode(self.token_bytes[t] if not self.special[t] else b"" for t in token_ids)
        text = "".join(c for c, _, _ in chars)
        words: list[Word] = []
        for char_start, char_end in _runs(text):
            start = min(chars[i][1] for i in range(char_start, char_end))
            end = max(chars[i][2] for i in range(char_start, char_end)) + 1
            if words and start < words[-1].end:  # a token carries bytes of both: one word
                start, char_start = words[-1].start, words.pop().char_start
            words.append(Word(start, end, text[char_start:char_end], char_start, char_end))
        return Segmentation(text=text, words=tuple(words))


def _decode(pieces: Iterable[bytes]) -> list[tuple[str, int, int]]:
    """(character, first token, last token) of each character of the tokens' bytes decoded together."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out: list[tuple[str, int, int]] = []
    pending_from, position = 0, -1
    for position, piece in enumerate(pieces):
        if not decoder.getstate()[0]:
            pending_from = position
        for index, char in enumerate(decoder.decode(piece)):
            out.append((char, pending_from if index == 0 else position, position))
        if decoder.getstate()[0] and out and out[-1][2] == position:
            pending_from = position
    for char in decoder.decode(b"", final=True):  # a truncated character at the end: U+FFFD
        out.append((char, pending_from, max(position, 0)))
    return out


def _kinds(text: str) -> list[int]:
    """Per character: 0 space, 1 word character (letters and digits of any script), 2 anything else.
    A combining mark or variation selector takes the kind of the character it modifies."""
    kinds: list[int] = []
    for char in text:
        if unicodedata.category(char).startswith("M"):
            kinds.append(kinds[-1] if kinds and kinds[-1] else 2)
        else:
            kinds.append(0 if char.isspace() else 1 if char.isalnum() else 2)
    return kinds


def _runs(text: str) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of one non-space kind of character."""
    kinds = _kinds(text)
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or kinds[i] != kinds[start]:
            if kinds[start] != 0:
                runs.append((start, i))
            start = i
    return runs


def _piece_bytes(piece: Any, text: str, byte_decoder: dict[str, int] | None) -> bytes:
    """The bytes a token stands for: byte-fallback `<0xNN>`, byte-level BPE's alphabet, or its text."""
    if not isinstance(piece, str):
        return text.encode()
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    if byte_decoder is not None and all(c in byte_decoder for c in piece):
        return bytes(byte_decoder[c] for c in piece)
    return text.encode()


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte alphabet

    return {char: byte for byte, char in bytes_to_unicode().items()}
