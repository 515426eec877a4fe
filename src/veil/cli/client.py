"""`veil client`: ask a veil server through CMIF (sanitize, embed in the enclave, send embeddings)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

from veil.client import CmifClient, ServerError
from veil.enclave.enclave import Backend, EnclaveConfig, default_cache_dir, open_enclave
from veil.errors import UsageError
from veil.model.config import ModelConfig
from veil.model.loader import bundled_checkpoint
from veil.privacy.accountant import BudgetExceededError, PrivacyAccountant
from veil.privacy.neighbours import CandidateSet

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
        help="total epsilon this principal may spend (kept in $VEIL_CACHE/cmif)",
    )
    parser.add_argument("--principal", default="default", help="whose budget to charge")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--candidates", choices=[c.value for c in CandidateSet], default=CandidateSet.GROUPS.value
    )
    parser.add_argument("--backend", choices=[b.value for b in Backend], default=Backend.AUTO.value)
    parser.add_argument(
        "--model", default=None, help="local checkpoint dir for the tokenizer (default: bundled)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    directory = Path(args.model) if args.model else bundled_checkpoint()
    model_config = ModelConfig.from_file(directory / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))  # public; the weights are not read here
    cache = default_cache_dir()
    ledger = _Ledger(cache / "cmif" / LEDGER)
    accountant = ledger.accountant(args.budget, args.principal)
    with httpx.Client(base_url=args.server, timeout=600.0) as http:
        model_id = _get(http, "/health")["model"]
        config = EnclaveConfig(model_id, model_config.vocab_size, model_config.hidden_size)
        with open_enclave(config, backend=Backend(args.backend), cache_dir=cache) as enclave:
            client = CmifClient(http, enclave, tokenizer, accountant=accountant, principal=args.principal)
            try:
                client.provision()
                if args.epsilon is not None:
                    enclave.enable_sanitizer(
                        tokenizer, epsilon=args.epsilon, candidates=CandidateSet(args.candidates)
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
            except ServerError as exc:
                raise UsageError(str(exc)) from None
            finally:
                ledger.save(accountant, args.principal)  # a charge stands even if the server failed
    print()
    print(
        f"veil: epsilon spent {answer.sanitized.epsilon_spent:g} on "
        f"{len(answer.sanitized.replaced_positions)} sanitized tokens; finish: {answer.finish_reason}",
        file=sys.stderr,
    )
    return 0


def _get(http: httpx.Client, path: str) -> dict[str, object]:
    try:
        response = http.get(path)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach the server: {exc}") from None
    if response.status_code != 200:
        raise UsageError(f"server answered {response.status_code} on {path}")
    return dict(response.json())


class _Ledger:
    """Epsilon spent per principal, kept across runs so a budget spans invocations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spent: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def accountant(self, budget: float | None, principal: str) -> PrivacyAccountant | None:
        if budget is None:
            return None
        accountant = PrivacyAccountant(budget)
        try:
            accountant.charge(principal, self.spent.get(principal, 0.0))
        except BudgetExceededError:
            raise UsageError(f"privacy budget of {principal!r} is already spent; nothing was sent") from None
        return accountant

    def save(self, accountant: PrivacyAccountant | None, principal: str) -> None:
        if accountant is None:
            return
        self.spent[principal] = accountant.spent(principal)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.spent))
        os.replace(tmp, self.path)
