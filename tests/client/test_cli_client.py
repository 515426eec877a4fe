"""`veil client` as a user runs it: bad input is one line (exit 2), never a traceback, nothing sent."""

from __future__ import annotations

import pytest

from veil.cli.main import main


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epsilon", "-1"], "--epsilon must be a positive"),
        (["--epsilon", "nan"], "--epsilon must be a positive"),
        (["--prompt", "   "], "--prompt is empty"),
        (["--budget", "-2"], "--budget must be"),
        (["--max-tokens", "0"], "--max-tokens must be"),
        (["--candidates", "top-k"], "--allow-top-k"),
    ],
)
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    argv = ["client", "--prompt", "hello", "--server", "http://127.0.0.1:9", *extra]  # nothing listens
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
