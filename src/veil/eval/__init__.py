"""Evaluations that need data or models fetched at first use (`veil eval ...`)."""
