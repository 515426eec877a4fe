"""Shared output helpers for benchmarks: a JSON object or an aligned table, and timing."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of the population `values` came from.

    The order-statistics (sign test) interval: with the n values sorted, [x_k, x_(n+1-k)] holds the
    median with probability 1 - 2 P(B <= k - 1), B ~ Binomial(n, 1/2), whatever the distribution,
    if the values are independent; k is the largest that keeps that at or above `confidence`. Used
    for paired ratios of interleaved benchmark rounds, where a machine's noise is neither normal nor
    constant (written here: the formula is two lines, and no dependency of the package has it).

    Returns:
        (low, high), or None if there are too few values to reach `confidence` (fewer than 6 at 95%).

    Raises:
        ValueError: if `confidence` is not in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ordered, n = sorted(values), len(values)
    tail, best = 0.0, None  # tail = P(B <= k - 1)
    for k in range(1, n // 2 + 1):
        tail += math.comb(n, k - 1) / 2**n
        if 1 - 2 * tail < confidence:
            break
        best = k
    return None if best is None else (ordered[best - 1], ordered[n - best])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows under headers, columns aligned; floats with 3 significant decimals."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def emit_json(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


def progress(message: str) -> None:
    """A progress line on stderr (stdout stays clean for --json)."""
    print(message, file=sys.stderr, flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
