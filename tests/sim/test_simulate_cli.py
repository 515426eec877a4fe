"""`veil simulate`: the replay scenario on a trace file, the validation file, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veil.cli.main import main
from veil.pipellm import MiB
from veil.trace import Op, TraceRecorder


def _weight_streaming_trace(path: Path) -> Path:
    """Three steps of 4 layers, each streaming 8 MiB before it computes."""
    rec = TraceRecorder(workload="offload", warmup_steps=1)
    for _ in range(3):
        rec.begin_step()
        for layer in range(4):
            rec.transfer(Op.H2D, layer, 0, 8 * MiB, 0)
            rec.compute(1e9, 8 * MiB, 0.0, rec.data_transfers)
        rec.end_step(16, 0.0)
    rec.trace.save(path)
    return path


def test_replay_prints_the_three_modes_and_the_validation_file(tmp_path: Path, capsys) -> None:
    trace = _weight_streaming_trace(tmp_path / "t.json")
    rows = [{"bench": "offload", "transport": "cc", "measured": 5.0, "predicted": 4.0, "error": -0.2}]
    (tmp_path / "v.json").write_text(json.dumps({"validation": rows}))
    argv = [
        "simulate",
        "--scenario",
        "replay",
        "--trace",
        str(trace),
        "--validation",
        str(tmp_path / "v.json"),
    ]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    figures = out["replay"]["tokens_per_s"]
    assert figures["plain"] > figures["pipellm"] >= figures["cc"] > 0
    assert out["replay"]["cc_drop"] > out["replay"]["pipellm_overhead"] >= 0
    assert out["validation"] == rows and out["validation_source"] == str(tmp_path / "v.json")


def test_more_sealing_cores_lower_the_replayed_overhead(tmp_path: Path, capsys) -> None:
    trace = _weight_streaming_trace(tmp_path / "t.json")
    overheads = []
    for cores in ("1", "16"):
        main(["simulate", "--scenario", "replay", "--trace", str(trace), "--spare-cores", cores, "--json"])
        overheads.append(json.loads(capsys.readouterr().out)["replay"]["pipellm_overhead"])
    assert overheads[1] < overheads[0]


def test_bad_input_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert main(["simulate", "--scenario", "replay"]) == 2
    assert "--trace" in capsys.readouterr().err
    assert main(["simulate", "--scenario", "replay", "--trace", "x", "--spare-cores", "-1"]) == 2
    trace = _weight_streaming_trace(tmp_path / "t.json")
    assert main(["simulate", "--scenario", "replay", "--trace", str(trace), "--validation", "nope.json"]) == 2
    with pytest.raises(SystemExit):
        main(["simulate", "--scenario", "nope"])


def test_the_validation_scenario_prints_only_the_validation_file(tmp_path: Path, capsys) -> None:
    rows = [{"bench": "kvswap", "transport": "plain", "measured": 2.0, "predicted": 2.2, "error": 0.1}]
    (tmp_path / "v.json").write_text(json.dumps({"validation": rows}))
    argv = ["simulate", "--scenario", "validation", "--validation", str(tmp_path / "v.json"), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["validation"] == rows and "rows" not in out and "replay" not in out


def test_the_message_costs_are_arguments_and_reach_the_replay(tmp_path: Path, capsys) -> None:
    """Dearer messages cost every sealed mode more (the trace's chunks are 1 MiB messages); the
    assumption is recorded with the result."""
    trace = _weight_streaming_trace(tmp_path / "t.json")
    base = ["simulate", "--scenario", "replay", "--trace", str(trace), "--json"]
    figures = []
    for message_us in ("0", "2000"):
        assert main([*base, "--message-us", message_us, "--commit-us", "0"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["hardware"]["message_s"] == pytest.approx(float(message_us) * 1e-6)
        assert out["hardware"]["commit_s"] == 0
        figures.append(out["replay"]["tokens_per_s"])
    assert figures[1]["cc"] < figures[0]["cc"] and figures[1]["pipellm"] < figures[0]["pipellm"]
    for bad in ("-1", "nan", "inf"):
        assert main([*base, "--commit-us", bad]) == 2
        assert "--commit-us" in capsys.readouterr().err
