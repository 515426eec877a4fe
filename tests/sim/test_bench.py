"""`veil bench sim --json`: one JSON object with a row per model, batch and core count."""

from __future__ import annotations

import argparse
import json

import pytest

from veil.bench import sim as sim_bench
from veil.errors import UsageError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    sim_bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_json_rows_carry_the_three_modes_and_the_paper_figure(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("--json", "--model", "opt-13b", "--batch", "64", "--spare-cores", "0", "16")
    args.max_requests = 1000  # one layer of 601 chunks would exceed it: the simulator streams one anyway
    assert sim_bench.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    none, many = out["rows"]
    assert none["paper_cc_drop"] == 0.362
    assert none["pipellm_tokens_per_s"] == pytest.approx(none["cc_tokens_per_s"], rel=0.01)
    assert many["plain_tokens_per_s"] >= many["pipellm_tokens_per_s"] > many["cc_tokens_per_s"]


def test_rejects_bad_options() -> None:
    with pytest.raises(UsageError):
        sim_bench.run(parse("--offload-fraction", "0"))
