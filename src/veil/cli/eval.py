"""`veil eval privacy`: utility and inversion risk of CMIF's sanitizers against SanText+ and CusText+."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from veil.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="run an evaluation and write its figures")
    names = parser.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    privacy = names.add_parser(
        "privacy", help="CMIF sanitizers vs SanText+ and CusText+ on movie reviews", description=__doc__
    )
    privacy.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    privacy.add_argument(
        "--quick", action="store_true", help="a smoke run: 80+40 sentences, the four main mechanisms"
    )
    privacy.add_argument(
        "--out",
        type=Path,
        default=Path("out/eval-privacy"),
        help="directory for privacy.json and privacy.png (default: %(default)s)",
    )
    privacy.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of --out's privacy.json (same settings) and measure only the missing ones",
    )
    privacy.add_argument(
        "--epsilons", type=str, default=None, help="comma-separated epsilons per token (default: 1,2,3,6)"
    )
    privacy.set_defaults(handler=run_privacy)


def _epsilons(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--epsilons must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < float("inf") for v in values):
        raise UsageError("--epsilons must be positive finite numbers")
    return values


def run_privacy(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from veil.eval.mechanisms import MECHANISMS, QUICK_MECHANISMS
    from veil.eval.privacy import FULL, QUICK, Experiment, Report
    from veil.eval.report import plot, table
    from veil.model.loader import load_model

    settings = QUICK if args.quick else FULL
    epsilons = _epsilons(args.epsilons)
    if epsilons is not None:
        settings = replace(settings, epsilons=epsilons)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {args.out}: {exc}") from None

    def save(report: Report) -> None:  # after every row, so a long run's partial figures are kept
        (args.out / "privacy.json").write_text(json.dumps(report.to_json(), indent=2))

    resume = None
    if args.resume and (args.out / "privacy.json").exists():
        resume = Report.from_json(json.loads((args.out / "privacy.json").read_text()))
        epsilons = tuple(sorted(set(resume.settings.epsilons) | set(settings.epsilons)))
        settings = replace(settings, epsilons=epsilons)
        print(f"[eval] resuming {len(resume.rows)} rows from {args.out / 'privacy.json'}", file=sys.stderr)
    mechanisms = QUICK_MECHANISMS if args.quick else MECHANISMS
    try:
        experiment = Experiment(load_model(), settings, resume=resume)
    except ValueError as exc:
        raise UsageError(f"--resume: {exc}") from None
    report = experiment.run(mechanisms, on_row=save)
    save(report)
    plot(report, args.out / "privacy.png")
    print(json.dumps(report.to_json()) if args.json else table(report))
    print(f"[eval] wrote {args.out / 'privacy.json'} and {args.out / 'privacy.png'}", file=sys.stderr)
    return 0
