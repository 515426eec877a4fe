"""`veil client`: ask a veil server through CMIF (sanitize, embed in the enclave, send embeddings)."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx

from veil.attest.evidence import Kem
from veil.client import CmifClient, ServerError
from veil.enclave.enclave import Backend, EnclaveConfig, default_cache_dir, open_enclave
from veil.enclave.simulated import SimulationModeWarning
from veil.errors import UsageError
from veil.model.config import ModelConfig
from veil.model.loader import bundled_checkpoint
from veil.privacy.accountant import BudgetExceededError
from veil.privacy.ledger import FileLedger
from veil.privacy.neighbours import CandidateSet, tqdm_progress
from veil.privacy.sanitizer import SanitizedPrompt

LEDGER = "budget-ledger.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("client", help="generate through a veil server with CMIF split inference")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--server", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="per-token epsilon of the sanitizer (omit: no sanitization, no data privacy)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="total epsilon this principal may spend (a locked ledger in $VEIL_CACHE/cmif)",
    )
    parser.add_argument("--principal", default="default", help="whose budget to charge")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--candidates", choices=[c.value for c in CandidateSet], default=CandidateSet.GROUPS.value
    )
    parser.add_argument(
        "--allow-top-k",
        action="store_true",
        help="accept --candidates top-k although it gives no DP bound between two tokens",
    )
    parser.add_argument("--backend", choices=[b.value for b in Backend], default=Backend.AUTO.value)
    parser.add_argument(
        "--kem",
        choices=[k.value for k in Kem],
        default=Kem.X25519.value,
        help="the enclave key's KEM for provisioning (mlkem768-x25519: hybrid post-quantum)",
    )
    parser.add_argument(
        "--model", default=None, help="local checkpoint dir for the tokenizer (default: bundled)"
    )
    parser.set_defaults(handler=run)


def _validate(args: argparse.Namespace) -> None:
    """Every user error is one line, before anything is loaded, charged or sent."""
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.epsilon is not None and not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise UsageError(f"--epsilon must be a positive finite number, got {args.epsilon}")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget >= 0):
        raise UsageError(f"--budget must be a non-negative finite number, got {args.budget}")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.candidates == CandidateSet.TOP_K.value and not args.allow_top_k:
        raise UsageError("--candidates top-k gives no DP bound between tokens; add --allow-top-k to accept")


def run(args: argparse.Namespace) -> int:
    _validate(args)
    from transformers import AutoTokenizer

    directory = Path(args.model) if args.model else bundled_checkpoint()
    model_config = ModelConfig.from_file(directory / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))  # public; the weights are not read here
    cache = default_cache_dir()
    ledger = FileLedger(cache / "cmif" / LEDGER, args.budget) if args.budget is not None else None
    with httpx.Client(base_url=args.server, timeout=600.0) as http:
        model_id = _get(http, "/health")["model"]
        config = EnclaveConfig(str(model_id), model_config.vocab_size, model_config.hidden_size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SimulationModeWarning)
            enclave = open_enclave(config, backend=Backend(args.backend), cache_dir=cache, kem=Kem(args.kem))
        if caught:
            print(
                "veil: SIMULATION MODE enclave: no hardware isolation, no real attestation", file=sys.stderr
            )
        with enclave:
            client = CmifClient(http, enclave, tokenizer, accountant=ledger, principal=args.principal)
            try:
                client.provision()
                if args.epsilon is not None:
                    enclave.enable_sanitizer(
                        tokenizer,
                        epsilon=args.epsilon,
                        candidates=CandidateSet(args.candidates),
                        allow_top_k=args.allow_top_k,
                        progress=tqdm_progress(),
                    )
                else:
                    print("veil: no --epsilon: the prompt is NOT sanitized", file=sys.stderr)
                answer = client.generate(
                    args.prompt,
                    max_tokens=args.max_tokens,
                    sanitize=args.epsilon is not None,
                    on_token=lambda _, text: print(text, end="", flush=True),
                )
            except BudgetExceededError as exc:
                raise UsageError(f"{exc}; nothing was sent") from None
            except (ServerError, ValueError) as exc:
                raise UsageError(str(exc)) from None
    print()
    _report(answer.sanitized, tokenizer)
    print(f"veil: finish: {answer.finish_reason}", file=sys.stderr)
    return 0


def _report(sanitized: SanitizedPrompt, tokenizer: Any) -> None:
    """Show the user, locally (stderr, never sent), what was replaced, by what, at what cost. Adjacent
    replaced tokens are shown together, so a word split into byte-level tokens reads as the word."""
    if not sanitized.replaced_positions:
        print("veil: nothing was replaced; epsilon spent 0", file=sys.stderr)
        return
    print("veil: replaced (shown here only; the server saw the right-hand side):", file=sys.stderr)
    runs: list[list[int]] = []
    for index, position in enumerate(sanitized.replaced_positions):
        if runs and position == sanitized.replaced_positions[runs[-1][-1]] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    for run in runs:
        before = tokenizer.decode([t for i in run for t in sanitized.originals[i]]).strip()
        after = tokenizer.decode([sanitized.token_ids[sanitized.replaced_positions[i]] for i in run]).strip()
        cost = sanitized.epsilon_per_unit * len(run)
        print(f"  {before!r} -> {after!r}  (epsilon {cost:g})", file=sys.stderr)
    print(
        f"veil: epsilon spent {sanitized.epsilon_spent:g} on {len(sanitized.replaced_positions)} units",
        file=sys.stderr,
    )


def _get(http: httpx.Client, path: str) -> dict[str, object]:
    try:
        response = http.get(path)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach the server: {exc}") from None
    if response.status_code != 200:
        raise UsageError(f"server answered {response.status_code} on {path}")
    return dict(response.json())
