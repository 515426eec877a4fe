"""`veil serve --api-key` and its environment variable, and an empty key refused before binding."""

from __future__ import annotations

import argparse

import pytest

from veil.cli import serve
from veil.errors import UsageError


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_api_key_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VEIL_API_KEY", raising=False)
    assert _parse([]).api_key is None
    assert _parse(["--api-key", "sk-1"]).api_key == "sk-1"
    monkeypatch.setenv("VEIL_API_KEY", "sk-env")
    assert _parse([]).api_key == "sk-env"
    assert _parse(["--api-key", "sk-1"]).api_key == "sk-1"


def test_an_empty_key_is_refused_before_anything_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_API_KEY", "")
    with pytest.raises(UsageError, match="empty"):
        serve.run(_parse(["--port", "0"]))
