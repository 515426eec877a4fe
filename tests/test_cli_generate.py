"""`veil generate` end to end: streaming, --json, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from veil.cli.main import main


def test_json_output(bundled, capsys) -> None:
    assert main(["generate", "--prompt", "The capital of France is", "--max-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"] == bundled.tokenizer("The capital of France is").input_ids
    assert 1 <= len(out["token_ids"]) <= 6
    assert out["text"] == bundled.tokenizer.decode(out["token_ids"], skip_special_tokens=True)
    assert out["tokens_per_s"] > 0


def test_chat_streams_an_answer(bundled, capsys) -> None:
    assert (
        main(["generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "12"]) == 0
    )
    assert "Paris" in capsys.readouterr().out


def test_seeded_sampling_reproducible(bundled, capsys) -> None:
    args = [
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "8",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--seed",
        "11",
        "--json",
    ]
    main(args)
    first = json.loads(capsys.readouterr().out)["token_ids"]
    main(args)
    assert json.loads(capsys.readouterr().out)["token_ids"] == first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "x", "--max-tokens", "-3"], "--max-tokens must be >= 0"),
        (["--prompt", "x", "--model", "/no/such/model"], "is not a directory"),
        (["--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli.main", "generate", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in proc.stderr
