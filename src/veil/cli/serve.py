"""`veil serve`: the model behind the HTTP API (plain completions and the CMIF split endpoints)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings
from pathlib import Path

import torch
import uvicorn

from veil.attest.reports import fingerprint
from veil.attest.verifier import Policy, Verifier
from veil.enclave.enclave import EnclaveConfig, default_cache_dir
from veil.enclave.simulated import platform_signer
from veil.engine.engine import DEFAULT_DEVICE_BLOCKS, EngineConfig, LoraConfig
from veil.engine.offload_policy import OffloadPolicy
from veil.engine.weights import compute_threads_beside_device
from veil.errors import UsageError
from veil.lora import Adapter, AdapterError, load_peft
from veil.model.loader import LoadedModel, load_model
from veil.server.app import create_app
from veil.server.service import InferenceService, Limits
from veil.transport.base import TransportKind


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the model over HTTP (plain and CMIF split inference)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--model", default=None, help="local Llama checkpoint dir (default: bundled)")
    parser.add_argument(
        "--accept-measurement",
        action="append",
        default=[],
        metavar="HEX",
        help="an enclave measurement to provision (repeatable)",
    )
    parser.add_argument(
        "--trust-signer",
        action="append",
        default=[],
        metavar="HEX",
        help="a report signer to trust: Ed25519 raw key or DER SPKI, hex (repeatable)",
    )
    parser.add_argument(
        "--accept-rtmrs",
        action="append",
        default=[],
        metavar="HEX",
        help="TDX: accepted RTMR0..3 concatenated (192 bytes hex, repeatable); without it no TD gets weights",
    )
    parser.add_argument(
        "--allow-simulated",
        action="store_true",
        help="DEMO ONLY: provision SIMULATED enclaves (this machine's simulated platform key "
        "and this code's measurement are trusted); protects nothing",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VEIL_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on the /v1 endpoints (default: $VEIL_API_KEY; "
        "unset: no key); /health and /metrics stay open",
    )
    parser.add_argument("--partition", action="store_true", help="enable the per-layer partition baseline")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    engine = parser.add_argument_group("the serving engine (emulated confidential device)")
    engine.add_argument(
        "--transport",
        choices=[k.value for k in TransportKind],
        default=TransportKind.PIPELLM.value,
        help="how weights and swapped KV blocks cross to the device (default pipellm)",
    )
    engine.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="MIB",
        help="device arena in MiB: the weights, then KV blocks in what is left (default: fit --kv-blocks)",
    )
    engine.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        metavar="N",
        help=f"KV blocks of 16 tokens on the device (default {DEFAULT_DEVICE_BLOCKS}, at least one "
        "request of --max-prompt-tokens + --max-new-tokens; with --device-memory: all that fits)",
    )
    engine.add_argument(
        "--swap-blocks", type=int, default=256, metavar="N", help="KV blocks of host swap space (default 256)"
    )
    engine.add_argument(
        "--offload",
        type=float,
        default=None,
        metavar="FRACTION",
        help="stream this fraction of the decoder layers from host memory through --transport",
    )
    engine.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once (default 64)")
    lora = parser.add_argument_group("LoRA adapters (a request selects one by its `model` field)")
    lora.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="PEFT adapter directories to serve, each under a model name",
    )
    lora.add_argument("--max-loras", type=int, default=4, help="adapter slots on the device (default 4)")
    lora.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank (default 16)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.offload is not None and not 0.0 <= args.offload <= 1.0:
        raise UsageError(f"--offload must be a fraction in [0, 1], got {args.offload}")
    if min(args.max_prompt_tokens, args.max_new_tokens, args.max_num_seqs) < 1:
        raise UsageError("--max-prompt-tokens, --max-new-tokens and --max-num-seqs must be >= 1")
    if args.api_key is not None and not args.api_key:
        raise UsageError("--api-key (or VEIL_API_KEY) is empty")
    modules = _lora_modules(args.lora_modules)
    if min(args.max_loras, args.max_lora_rank) < 1:
        raise UsageError("--max-loras and --max-lora-rank must be >= 1")
    sock = _bind(args.host, args.port)  # a busy port fails now, not after the model loaded
    port = sock.getsockname()[1]
    with sock:
        loaded = load_model(args.model)
        model_id = loaded.path.name
        config = EnclaveConfig(model_id, loaded.config.vocab_size, loaded.config.hidden_size)
        policy = _policy(args, config)
        widest = max(loaded.config.hidden_size, loaded.config.intermediate_size if args.partition else 0)
        limits = Limits(
            args.max_prompt_tokens, args.max_new_tokens, args.max_prompt_tokens * widest * 4 + 4096
        )
        engine = _engine_config(args, bool(modules))
        adapters = _load_adapters(modules, loaded)
        try:
            arena, blocks = engine.geometry(loaded.model)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if engine.offload is not None:
            torch.set_num_threads(compute_threads_beside_device())
        with InferenceService(loaded, model_id, limits, engine) as service:
            for name, adapter in adapters.items():
                try:
                    service.add_adapter(name, adapter)
                except ValueError as exc:
                    raise UsageError(f"--lora-modules {name}: {exc}") from None
            app = create_app(service, Verifier(policy), enable_partition=args.partition, api_key=args.api_key)
            keyed = "an API key" if args.api_key else "no API key"
            print(
                f"veil: serving {model_id} on http://{args.host}:{port} over {args.transport}; device arena "
                f"{arena / 2**20:.1f} MiB with {blocks} KV blocks ({blocks * engine.block_size} tokens); "
                f"{keyed} on /v1" + (f"; LoRA adapters: {', '.join(adapters)}" if adapters else ""),
                file=sys.stderr,
                flush=True,
            )
            server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
            server.run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _lora_modules(specs: list[str]) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--lora-modules takes NAME=PATH, got {spec!r}")
        if name in modules:
            raise UsageError(f"--lora-modules names {name!r} twice")
        modules[name] = Path(path)
    return modules


def _load_adapters(modules: dict[str, Path], loaded: LoadedModel) -> dict[str, Adapter]:
    adapters = {}
    for name, path in modules.items():
        try:
            adapters[name] = load_peft(path, loaded.config)
        except AdapterError as exc:
            raise UsageError(f"--lora-modules {name}: {exc}") from None
    return adapters


def _engine_config(args: argparse.Namespace, lora: bool = False) -> EngineConfig:
    blocks = args.kv_blocks
    if blocks is None and args.device_memory is None:
        blocks = max(DEFAULT_DEVICE_BLOCKS, -(-(args.max_prompt_tokens + args.max_new_tokens) // 16))
    return EngineConfig(
        transport=TransportKind(args.transport),
        num_device_blocks=blocks,
        num_host_blocks=args.swap_blocks,
        device_memory_bytes=None if args.device_memory is None else int(args.device_memory * 2**20),
        max_num_seqs=args.max_num_seqs,
        offload=None if args.offload is None else OffloadPolicy(resident_fraction=1.0 - args.offload),
        lora=LoraConfig(num_slots=args.max_loras, max_rank=args.max_lora_rank) if lora else None,
    )


def _policy(args: argparse.Namespace, config: EnclaveConfig) -> Policy:
    try:
        measurements = {bytes.fromhex(m) for m in args.accept_measurement}
        signers = {bytes.fromhex(s) for s in args.trust_signer}
        rtmrs = {bytes.fromhex(r) for r in args.accept_rtmrs}
    except ValueError as exc:
        raise UsageError(f"measurements, signers and RTMRs are hex strings: {exc}") from None
    if any(len(r) != 192 for r in rtmrs):
        raise UsageError("--accept-rtmrs takes RTMR0..3 concatenated: 192 bytes (384 hex digits)")
    if args.allow_simulated:
        warnings.warn("SIMULATION MODE accepted: simulated enclaves get the weights", stacklevel=1)
        print(
            "veil: *** --allow-simulated: SIMULATED enclaves will be provisioned; this protects NOTHING ***",
            file=sys.stderr,
        )
        measurements.add(config.simulated_measurement())
        signers.add(platform_signer(default_cache_dir()))
    if not measurements or not signers:
        print("veil: no accepted measurement or trusted signer: provisioning is disabled", file=sys.stderr)
    for signer in sorted(signers):
        print(f"veil: trusting signer {fingerprint(signer)}", file=sys.stderr)
    return Policy(
        frozenset(measurements),
        frozenset(signers),
        allow_simulated=args.allow_simulated,
        accepted_rtmrs=frozenset(rtmrs),
    )
