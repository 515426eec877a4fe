"""Entry point of the `veil` console script.

Each subcommand lives in its own module with a `register(subparsers)` function that adds its parser and
sets `handler` (a callable taking the parsed namespace and returning an exit status). Bad input raises
`UsageError`, reported here as one line on stderr with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from veil.cli import bench, generate
from veil.cli import client as client_command
from veil.cli import demo as demo_command
from veil.cli import eval as eval_command
from veil.cli import serve as serve_command
from veil.cli import simulate as simulate_command
from veil.errors import UsageError

COMMANDS = (demo_command, generate, bench, serve_command, client_command, eval_command, simulate_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description="Confidential LLM inference runtime.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("veil: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
