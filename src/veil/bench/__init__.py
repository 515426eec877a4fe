"""Benchmarks behind `veil bench`. Ratios are measured side by side in one process."""
