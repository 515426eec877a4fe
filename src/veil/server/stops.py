"""Stop strings over a text stream: what may be released now, and where the stream stops.

OpenAI's `stop` ends a completion at the first occurrence of any of up to four strings, and the
answer excludes the string. A stream must not release text that may yet turn out to begin a stop
string, so `StopMatcher` holds back the longest tail of the text that is a prefix of some stop string
and releases it only once it no longer can be (or at the end of the stream). With several stop
strings, the first one completed wins (two completed by the same piece: the one that starts first).
Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text pieces in order; each `feed` returns the text now safe to release and whether a stop
    string was completed (the text before it is then everything left to release)."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._held = ""  # released to nobody yet: may be the start of a stop string
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to release, whether the stream stopped here). Nothing may be fed after a stop."""
        if self.stopped:
            raise ValueError("the stream already stopped")
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held, self.stopped = "", True
            return text[:cut], True
        hold = self._longest_open_prefix(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """What is held at the end of the stream (it never completed a stop string)."""
        text, self._held = self._held, ""
        return text

    def _longest_open_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
