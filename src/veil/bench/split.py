"""`veil bench split`: one request through plain, CMIF, TEE-only and per-layer partition, side by side.

All four run here against a real uvicorn server on loopback, in one process on one CPU: the client's
and the server's compute share the same cores, so the measured ratios say how much each setup adds on
top of the same compute, not what a GPU server and an SGX client would show. For that, each setup is
also projected (`split_projection`) onto an H100 server and an SGX-class client, beside the paper's
figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from veil.attest.verifier import Policy, Verifier
from veil.bench.report import emit_json, print_table, progress
from veil.bench.split_projection import H100, LLAMA2_7B, SGX_CLIENT, WAN, ModelShape, project
from veil.client import CmifClient
from veil.enclave.enclave import Backend, EnclaveConfig, open_enclave
from veil.enclave.simulated import platform_signer
from veil.errors import UsageError
from veil.eval.partition import PartitionClient, Result, plain_generate, tee_only_generate
from veil.model.loader import LoadedModel, load_model
from veil.privacy.neighbours import CandidateSet
from veil.server.app import create_app
from veil.server.runner import ServerThread
from veil.server.service import InferenceService, Limits

NAME = "split"
HELP = "latency, round trips and bytes of plain, CMIF, TEE-only and per-layer partition inference"
PAPER = {"tee_only_overhead": 6.5, "cmif_overhead": 1.54}  # CMIF (DASFAA 2025), TEE overhead vs plain
SETUPS = ("plain", "cmif", "tee_only", "partition")
TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "grain, salt and cloth. Over the centuries the market grew into a town with walls, a bridge and a "
    "cathedral, and the town into a city that drew people from the whole region. "
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated (default 32)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="CMIF sanitizer epsilon per token")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved rounds of plain, CMIF and TEE-only; the median is kept (default 3)",
    )
    parser.add_argument(
        "--candidates", choices=[c.value for c in CandidateSet], default=CandidateSet.GROUPS.value
    )
    parser.add_argument(
        "--allow-top-k",
        action="store_true",
        help="accept --candidates top-k, which gives no DP bound between two tokens (charged as unbounded)",
    )


def run(args: argparse.Namespace) -> int:
    if args.candidates == CandidateSet.TOP_K.value and not args.allow_top_k:
        raise UsageError("--candidates top-k gives no DP bound between tokens; add --allow-top-k to accept")
    loaded = load_model(progress=False)
    ids = (loaded.tokenizer(TEXT * 20, add_special_tokens=False)["input_ids"])[: args.prompt_tokens]
    measured = _measure_all(loaded, ids, args)
    cmif = measured["cmif"]
    sanitize_fraction = cmif["client_compute_s"] / cmif["latency_s"]
    projected = {}
    for shape in (_shape(loaded), LLAMA2_7B):
        p = project(shape, len(ids), args.new_tokens, sanitize_fraction=sanitize_fraction)
        projected[shape.name] = {
            **{f"{k}": v for k, v in dataclasses.asdict(p).items()},
            "cmif_over_plain": p.cmif_s / p.plain_s,
            "tee_only_over_plain": p.tee_only_s / p.plain_s,
            "partition_over_plain": p.partition_s / p.plain_s,
        }
    result: dict[str, Any] = {
        **measured,
        "ratios_measured": {s: measured[s]["latency_s"] / measured["plain"]["latency_s"] for s in SETUPS},
        "projection": projected,
        "hardware": {"server": H100.note, "client": SGX_CLIENT.note, "link": WAN.note},
        "paper": PAPER,
        "prompt_tokens": len(ids),
    }
    if args.json:
        emit_json(result)
    else:
        _print(result)
    return 0


def _measure_all(loaded: LoadedModel, ids: list[int], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    hidden = loaded.config.hidden_size
    widest = max(hidden, loaded.config.intermediate_size)  # the partition sends w_down's input
    limits = Limits(max(1024, len(ids)), max(256, args.new_tokens), len(ids) * widest * 4 + 4096)
    config = EnclaveConfig("bench-model", loaded.config.vocab_size, hidden)
    with tempfile.TemporaryDirectory(prefix="veil-bench-split-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # simulation mode is the point here
        cache = Path(tmp)
        policy = Policy(
            frozenset({config.simulated_measurement()}), frozenset({platform_signer(cache)}), True
        )
        with (
            InferenceService(loaded, config.model_id, limits) as service,
            ServerThread(create_app(service, Verifier(policy), enable_partition=True)) as server,
            httpx.Client(base_url=server.url, timeout=600.0) as http,
            open_enclave(config, backend=Backend.SIMULATED, cache_dir=cache) as enclave,
        ):
            client = CmifClient(http, enclave, loaded.tokenizer)
            client.provision(use_sealed=False)
            session = enclave.session_token
            enclave.enable_sanitizer(
                loaded.tokenizer,
                epsilon=args.epsilon,
                candidates=CandidateSet(args.candidates),
                allow_top_k=args.allow_top_k,
            )
            n = args.new_tokens
            plain_generate(http, ids[:8], max_tokens=2)  # warm up the server path
            runs: dict[str, Callable[[], Result]] = {
                "plain": lambda: plain_generate(http, ids, max_tokens=n),
                "cmif": lambda: _cmif(client, ids, n),
                "tee_only": lambda: tee_only_generate(loaded, ids, max_tokens=n),
                "partition": lambda: PartitionClient(http, loaded, session).generate(ids, max_tokens=n),
            }
            samples: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
            for round_index in range(max(1, args.repeats)):
                for name, fn in runs.items():
                    if name == "partition" and round_index > 0:
                        continue  # minutes per run, and its ratio is far from the others
                    progress(f"veil bench split: {name} (round {round_index + 1})")
                    before = service.compute_s
                    started = time.perf_counter()
                    result = fn()
                    latency = time.perf_counter() - started
                    samples[name].append(_row(result, latency, service.compute_s - before))
            out = {
                name: sorted(rows, key=lambda r: r["latency_s"])[len(rows) // 2]
                for name, rows in samples.items()
            }
            return out


def _cmif(client: CmifClient, ids: list[int], n: int) -> Result:
    answer = client.generate(ids, max_tokens=n)
    return Result(answer.token_ids, answer.client_compute_s, answer.server_compute_s, answer.meter)


def _row(result: Result, latency_s: float, server_s: float) -> dict[str, Any]:
    return {
        "latency_s": latency_s,
        "round_trips": result.meter.round_trips,
        "bytes_sent": result.meter.bytes_sent,
        "bytes_received": result.meter.bytes_received,
        "client_compute_s": result.client_compute_s,
        "server_compute_s": server_s,
        "new_tokens": len(result.token_ids),
    }


def _shape(loaded: LoadedModel) -> ModelShape:
    c = loaded.config
    return ModelShape(
        loaded.path.name, c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size, c.kv_size
    )


def _print(result: dict[str, Any]) -> None:
    print(f"measured here (one CPU, loopback; prompt {result['prompt_tokens']} tokens):")
    headers = [
        "setup",
        "latency_s",
        "x plain",
        "round_trips",
        "bytes_sent",
        "bytes_recv",
        "client_s",
        "server_s",
        "tokens",
    ]
    rows = []
    for s in SETUPS:
        r = result[s]
        rows.append(
            [
                s,
                r["latency_s"],
                result["ratios_measured"][s],
                r["round_trips"],
                r["bytes_sent"],
                r["bytes_received"],
                r["client_compute_s"],
                r["server_compute_s"],
                r["new_tokens"],
            ]
        )
    print_table(headers, rows)
    print("\nprojected (H100 server, SGX2 client, 10 ms / 1 Gbit/s link), latency in s and x plain:")
    rows = [
        [
            name,
            p["plain_s"],
            p["cmif_s"],
            p["cmif_over_plain"],
            p["tee_only_s"],
            p["tee_only_over_plain"],
            p["partition_s"],
            p["partition_over_plain"],
        ]
        for name, p in result["projection"].items()
    ]
    print_table(["model", "plain", "cmif", "x", "tee_only", "x", "partition", "x"], rows)
    print(f"\npaper (CMIF, SGX2): TEE-only {PAPER['tee_only_overhead']}x, CMIF {PAPER['cmif_overhead']}x")
    for key, note in result["hardware"].items():
        print(f"  {key}: {note}")
