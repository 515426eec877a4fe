"""`veil serve`: the model behind the HTTP API (plain completions and the CMIF split endpoints)."""

from __future__ import annotations

import argparse
import sys
import warnings

import uvicorn

from veil.attest.reports import fingerprint
from veil.attest.verifier import Policy, Verifier
from veil.enclave.enclave import EnclaveConfig, default_cache_dir
from veil.enclave.simulated import platform_signer
from veil.errors import UsageError
from veil.model.loader import load_model
from veil.server.app import create_app
from veil.server.service import InferenceService, Limits


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
    parser.add_argument("--partition", action="store_true", help="enable the per-layer partition baseline")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    model_id = loaded.path.name
    config = EnclaveConfig(model_id, loaded.config.vocab_size, loaded.config.hidden_size)
    policy = _policy(args, config)
    widest = max(loaded.config.hidden_size, loaded.config.intermediate_size if args.partition else 0)
    limits = Limits(args.max_prompt_tokens, args.max_new_tokens, args.max_prompt_tokens * widest * 4 + 4096)
    with InferenceService(loaded, model_id, limits) as service:
        app = create_app(service, Verifier(policy), enable_partition=args.partition)
        print(f"veil: serving {model_id} on http://{args.host}:{args.port}", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


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
