"""Stop strings over a stream: released text never includes a stop string, however the text is cut
into pieces, and the released text is exactly what precedes the first stop."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.server.stops import StopMatcher


def _run(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["Hello", " wor", "ld", "!"], ["world"], ("Hello ", True)),
        (["Hel", "lo"], ["lo w"], ("Hello", False)),  # a held prefix that never completes
        (["a", "b", "c"], [], ("abc", False)),
        (["ab", "cab", "d"], ["abd", "ca"], ("ab", True)),  # the earliest occurrence wins
        (["x\n", "\n"], ["\n\n"], ("x", True)),
        (["END"], ["END"], ("", True)),
    ],
)
def test_cases(pieces: list[str], stops: list[str], expected: tuple[str, bool]) -> None:
    assert _run(pieces, stops) == expected


@settings(max_examples=50, deadline=None)
@given(
    st.text(alphabet="abc", max_size=30),
    st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=1),
    st.lists(st.integers(0, 30), max_size=6),
)
def test_any_cut_releases_the_text_before_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    assert _run(pieces, stops) == ((text[:first], True) if first >= 0 else (text, False))


def test_empty_stop_strings_are_refused() -> None:
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])
