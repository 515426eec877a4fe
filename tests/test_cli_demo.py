"""`veil demo` (README's first command) end to end, bounded: both papers at work, and its report."""

from __future__ import annotations

import re

import pytest

from veil.cli.main import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_main_job_runs_end_to_end_and_reports_what_protected_what(bundled, capsys) -> None:
    assert main(["demo", "--max-tokens", "3", "--offload", "0.3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("answer: ")
    report = captured.err
    replaced = re.search(r"(\d+) of (\d+) prompt tokens replaced, epsilon spent ([\d.]+)", report)
    assert replaced is not None and int(replaced[1]) > 0
    assert float(replaced[3]) == pytest.approx(2.0 * int(replaced[1]))  # epsilon 2 per replaced token
    sealed = re.search(r"(\d+) MiB sealed host-to-device in (\d+) messages", report)
    assert sealed is not None and int(sealed[1]) > 0
    assert "0 integrity failures" in report and "SIMULATED" in report
    assert re.search(r"PipeLLM: \d+ of \d+ chunks pre-sealed", report)
    assert re.search(r"prefill: \d+ windows", report) and re.search(r"decode: \d+ windows", report)
    assert "answers identical" in report  # the sealed and the plain server computed the same tokens
    assert "after an untimed warm-up request" in report
    assert "both servers shut down" in report


def test_the_main_job_runs_under_cc_for_comparison(bundled, capsys) -> None:
    assert main(["demo", "--max-tokens", "2", "--offload", "0.2", "--transport", "cc"]) == 0
    report = capsys.readouterr().err
    assert "cc transport" in report and "PipeLLM:" not in report
    assert re.search(r"(\d+) MiB sealed host-to-device", report) and "answers identical" in report


def test_bad_arguments_are_one_line_errors(capsys) -> None:
    assert main(["demo", "--max-tokens", "0"]) == 2
    assert "--max-tokens must be >= 1" in capsys.readouterr().err
