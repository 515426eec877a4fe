"""Text of a token stream, one token at a time, without splitting a character.

A byte-level BPE token may hold part of a UTF-8 character (most CJK characters and emoji take two or
three tokens of SmolLM2's vocabulary), so decoding each token alone yields replacement characters.
`IncrementalDetokenizer` decodes the tokens since the last complete character together and releases
text only once it no longer ends in an incomplete character; the pieces it returns concatenate to the
decoding of the whole stream (special tokens skipped).
"""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"  # what the tokenizer decodes a partial UTF-8 sequence to


class IncrementalDetokenizer:
    """Turns token ids into text pieces as they arrive (see the module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._pending: list[int] = []  # tokens since the last released text

    def add(self, token_id: int) -> str:
        """The text completed by `token_id` ("" while a character is still incomplete)."""
        self._pending.append(token_id)
        text = self._tokenizer.decode(self._pending, skip_special_tokens=True)
        if text.endswith(_INCOMPLETE) and len(self._pending) < 4:  # a UTF-8 character spans <= 4 bytes
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the end of the stream)."""
        text = self._tokenizer.decode(self._pending, skip_special_tokens=True) if self._pending else ""
        self._pending.clear()
        return text
