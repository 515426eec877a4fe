"""`veil bench NAME`: benchmarks that print figures measured side by side in one run.

Each benchmark is a module in `veil.bench` with `NAME`, `HELP`, `add_arguments(parser)` and
`run(args) -> int`. Every benchmark accepts `--json` (one JSON object on stdout, nothing else there).
"""

from __future__ import annotations

import argparse
from types import ModuleType

from veil.bench import adapters as lora_bench
from veil.bench import kvswap as kvswap_bench
from veil.bench import load as load_bench
from veil.bench import model as model_bench
from veil.bench import offload as offload_bench
from veil.bench import serve as serve_bench
from veil.bench import sim as sim_bench
from veil.bench import split as split_bench
from veil.bench import stream as stream_bench
from veil.bench import transfer as transfer_bench

BENCHMARKS: tuple[ModuleType, ...] = (
    model_bench,
    transfer_bench,
    offload_bench,
    split_bench,
    stream_bench,
    sim_bench,
    serve_bench,
    kvswap_bench,
    lora_bench,
    load_bench,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and print its figures")
    names = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for module in BENCHMARKS:
        sub = names.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        sub.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
