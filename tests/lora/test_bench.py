"""The gather-vs-grouped benchmark runs, both variants agree, and it reports positive times."""

from __future__ import annotations

from veil.lora.bench import Case, compare

from .support import tiny_pair


def test_compare_on_a_tiny_model() -> None:
    _, model = tiny_pair()
    cases = (Case(rows=4, tokens=1, adapters=2, base_rows=1), Case(rows=2, tokens=5, adapters=1))
    figures = compare(cases, config=model.config, rank=4, repeats=2)  # raises if the variants disagree
    assert [f.case for f in figures] == list(cases)
    assert all(min(f.base_ms, f.grouped_ms, f.gathered_ms) > 0 for f in figures)
