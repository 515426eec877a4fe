"""The evaluation's pieces that need no model: data parsing and fetching, the attack, the report, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from veil.cli.main import main
from veil.eval import data
from veil.eval.attack import KnnInverter
from veil.eval.privacy import Report, Row, Settings
from veil.eval.report import plot, table

GROUND_TRUTH = "1\t2.3\tA fine film.\r\n2\t-0.6\tTepid.\r\n3\t-1.5\tDull and long.\r\n4\t1.0\tGood.\r\n"


def test_parse_keeps_strong_ratings_with_their_sign():
    examples = data.parse_ground_truth(GROUND_TRUTH)
    assert [(e.text, e.label) for e in examples] == [("A fine film.", 1), ("Dull and long.", 0), ("Good.", 1)]


def test_split_is_fixed_by_its_seed_and_disjoint():
    examples = [data.Example(f"s{i}", i % 2) for i in range(100)]
    a, b = data.split(examples, seed=3), data.split(examples, seed=3)
    assert a == b and len(a.test) == 30 and not set(a.test) & set(a.train)
    assert data.split(examples, seed=4).test != a.test


def test_fetch_refuses_bytes_that_do_not_match_the_pin(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path))
    downloads = tmp_path / "eval" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / data.VADER_SDIST[1]).write_bytes(b"not the archive")
    with pytest.raises(data.FetchError, match="sha256"):
        data.fetch(*data.VADER_SDIST, source=True)
    assert not (downloads / data.VADER_SDIST[1]).exists()  # the bad file is not kept


def test_knn_inversion_counts_originals_among_neighbours():
    embeddings = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0], [0.0, 6.0]], dtype=np.float32)
    inverter = KnnInverter(embeddings, k=2)
    result = inverter.attack([1, 2, 3], [[1], [3], [0]])
    assert result.num_units == 3
    assert result.top1 == pytest.approx(1 / 3)  # only token 1 was sent unchanged
    assert result.top10 == pytest.approx(2 / 3)  # 3 is among 2's two nearest; 0 is not among 3's


def test_report_table_and_plot(tmp_path):
    report = Report(Settings(1, 1, 1, 1))
    report.rows = [Row("none", None, 0.9, 0.8, 1, 1, 0, 0, 1, 0, 1.0)]
    report.rows += [
        Row("veil-groups", e, 0.6 + e / 20, 0.7, 0.1, 0.3, 0.5, 0.6, 0.5, 10 * e, 1.0) for e in (1, 2)
    ]
    report.cost = {"sanitize_ms": 0.5, "forward_ms": 300.0, "num_tokens": 128, "ratio_percent": 0.17}
    text = table(report)
    assert "veil-groups" in text and "0.17%" in text
    plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_report_round_trips_through_json_for_resuming():
    report = Report(Settings(3, 2, 2, 1, epsilons=(1.0, 2.0)), mechanisms={"veil-groups": "groups"})
    report.rows = [Row("none", None, 0.9, 0.8, 1, 1, 0, 0, 1, 0, 1.0)]
    report.rows += [Row("veil-groups", 1.0, 0.6, 0.7, 0.1, 0.3, 0.5, 0.6, 0.5, 10, 1.0, cpu_seconds=2.0)]
    back = Report.from_json(json.loads(json.dumps(report.to_json())))
    assert back == report
    assert back.has_row("none", None) and back.has_row("veil-groups", 1.0)
    assert not back.has_row("veil-groups", 2.0)


def test_cli_rejects_bad_epsilons(capsys):
    assert main(["eval", "privacy", "--epsilons", "1,x"]) == 2
    assert "--epsilons" in capsys.readouterr().err
    assert main(["eval", "privacy", "--epsilons", "0"]) == 2
