"""`veil bench load`'s accounting: a stream that differs from its reference counts its lost and
duplicated tokens; equal streams count none."""

from __future__ import annotations

from veil.bench.load import _Load, _summary


def test_lost_and_duplicated_tokens_are_counted(loaded) -> None:
    references = ["The cat sat on the mat.", "Hello world"]
    load = _Load(
        elapsed_s=2.0,
        requests=4,
        errors=["HTTP 503: ..."],
        ttft_s=[0.1, 0.3],
        itl_s=[0.01, 0.02],
        completion_tokens=10,
        texts=[(0, "The cat sat on the mat."), (0, "The cat on the mat."), (1, "Hello world world")],
    )
    summary = _summary(load, references, loaded)
    assert summary["errors"] == 1 and summary["mismatched_streams"] == 2
    assert summary["lost_tokens"] == 1  # " sat"
    assert summary["duplicated_tokens"] == 1  # " world"
    assert summary["tokens_per_s"] == 5.0 and summary["ttft_p50_s"] == 0.2
