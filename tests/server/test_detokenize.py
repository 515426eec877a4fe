"""Streaming text never splits a character, and the pieces add up to the whole decoding."""

from __future__ import annotations

import pytest

from veil.server.detokenize import IncrementalDetokenizer


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! It's 42.",
        "私の名前はアリスです。東京に住んでいます。",
        "Привет, мир",
        "🌟🚀 ok 👍🏽",
        "مرحبا بالعالم",
    ],
)
def test_pieces_concatenate_to_the_whole_and_hold_no_broken_character(loaded, text: str) -> None:
    tokenizer = loaded.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in piece for piece in pieces)
    if any("\ufffd" in tokenizer.decode([i]) for i in ids):  # a character spans several tokens
        assert "" in pieces[:-1]  # held until complete


def test_a_stream_cut_inside_a_character_still_releases_its_bytes(loaded) -> None:
    ids = loaded.tokenizer("東", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(loaded.tokenizer)
    held = [detok.add(i) for i in ids[:-1]]
    assert all(piece == "" for piece in held)
    assert detok.flush() != ""  # the replacement character: the client sees the stream was cut
