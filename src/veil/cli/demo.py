"""`veil demo`: the main job. Both papers at work on the bundled model, end to end, on loopback.

1. A veil server starts in this process on a free loopback port: the serving engine on the emulated
   confidential device with a device memory smaller than the model, so most decoder layers stream in
   from host memory through the `pipellm` transport (every byte sealed with AES-256-GCM, sealing
   speculated ahead), PipeLLM's first workload. `--transport cc` runs the same job with every chunk
   sealed in the caller instead, to compare.
2. A CMIF client opens its enclave (simulated on this machine: no hardware isolation, said plainly),
   attests to the server and is provisioned with the embedding table wrapped for its key (HPKE).
3. The prompt is sanitized inside the enclave (Report-Noisy-Max token replacement, epsilon per
   replaced token), embedded there, and only the embeddings are sent; the answer streams back.
4. The same sanitized prompt goes to a second server identical but for its `plain` transport (nothing
   sealed), to measure what confidentiality cost in this same job. Each server first answers a short
   untimed warm-up request of public text, as a running server would have long before: caches, the
   allocator and PipeLLM's governors are then in their steady state when the timed request comes.
   PipeLLM keeps one governor per phase (docs/pipellm.md): its one prefill step (about 6.6 windows
   of 32 MiB with half the layers streamed) covers the prefill governor's first window of sealing in
   the caller, its first probe of speculation and the bracket after it (4.5 windows at most), and
   its 11 decode steps (about 70 windows) do the same for the decode governor: a server pays for
   those once, and a 32-token request would otherwise pay for them.
5. Both servers shut down, and the job prints what protected what.

The server trusts this machine's simulated enclave (DEMO ONLY, as `veil serve --allow-simulated`).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from veil.attest.verifier import Policy, Verifier
from veil.client import Answer, CmifClient
from veil.enclave.enclave import Backend, EnclaveConfig, default_cache_dir, open_enclave
from veil.enclave.simulated import SimulationModeWarning, platform_signer
from veil.engine.engine import EngineConfig
from veil.engine.offload_policy import OffloadPolicy
from veil.engine.weights import compute_threads_beside_device
from veil.errors import UsageError
from veil.model.loader import LoadedModel, load_model
from veil.pipellm.governor import GovernorStats
from veil.privacy.neighbours import CandidateSet, tqdm_progress
from veil.server.app import create_app
from veil.server.runner import ServerThread
from veil.server.service import InferenceService, Limits
from veil.transport.base import TransportKind, TransportStats

WARMUP_TEXT = "Confidential computing protects data in use."  # public: sent unsanitized
WARMUP_TOKENS = 12
DEFAULT_PROMPT = (
    "Alice Smith lives at 42 Baker Street in London. She works as a nurse, and in her free time she"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="the main job: a CMIF client against a confidential PipeLLM server, end to end"
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt (sent sanitized, as embeddings)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--epsilon", type=float, default=2.0, help="epsilon per replaced token (default 2)")
    parser.add_argument(
        "--offload",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="share of the decoder layers streamed from host memory (default 0.5)",
    )
    parser.add_argument(
        "--transport",
        choices=[TransportKind.PIPELLM.value, TransportKind.CC.value],
        default=TransportKind.PIPELLM.value,
        help="the confidential server's transport (default pipellm; cc seals every chunk in the caller, "
        "for comparison)",
    )
    parser.set_defaults(handler=run)


@dataclass
class Served:
    answer: Answer
    seconds: float  # from sending the embeddings to the last token (the warm-up request excluded)
    transport: TransportStats
    arena_bytes: int


def run(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.max_tokens < 1 or not 0.0 <= args.offload <= 1.0 or not args.epsilon > 0:
        raise UsageError("--max-tokens must be >= 1, --offload in [0, 1] and --epsilon > 0")
    started = time.perf_counter()
    torch.set_num_threads(compute_threads_beside_device())
    loaded = load_model()
    model_id = loaded.path.name
    cache = default_cache_dir()
    config = EnclaveConfig(model_id, loaded.config.vocab_size, loaded.config.hidden_size)
    policy = Policy(
        frozenset({config.simulated_measurement()}),
        frozenset({platform_signer(cache)}),
        allow_simulated=True,
    )
    offload = OffloadPolicy(resident_fraction=1.0 - args.offload)
    _say(f"the client's prompt: {args.prompt!r}")
    prompt = list(loaded.tokenizer(args.prompt, add_special_tokens=False).input_ids)
    kind = TransportKind(args.transport)
    confidential = _serve(loaded, model_id, policy, cache, config, offload, kind, args, prompt)
    # the same sanitized prompt, not a fresh draw: the two runs must compute the same thing
    same = list(confidential.answer.sanitized.token_ids)
    baseline = _serve(loaded, model_id, policy, cache, config, offload, TransportKind.PLAIN, args, same)
    _report(loaded, confidential, baseline, time.perf_counter() - started)
    return 0


def _serve(
    loaded: LoadedModel,
    model_id: str,
    policy: Policy,
    cache: Path,
    config: EnclaveConfig,
    offload: OffloadPolicy,
    kind: TransportKind,
    args: argparse.Namespace,
    prompt: list[int],
) -> Served:
    """Start a server with `kind`, run the CMIF client against it, stop it. The confidential run
    sanitizes `prompt` in the enclave; the baseline sends the already sanitized `prompt` as it is."""
    engine = EngineConfig(transport=kind, num_device_blocks=16, num_host_blocks=0, offload=offload)
    limits = Limits(max_prompt_tokens=256, max_new_tokens=max(args.max_tokens, 16))
    with (
        warnings.catch_warnings(),
        InferenceService(loaded, model_id, limits, engine) as service,
        ServerThread(create_app(service, Verifier(policy))) as server,
    ):
        warnings.simplefilter("ignore", SimulationModeWarning)
        arena = engine.geometry(loaded.model)[0]
        confidential = kind is not TransportKind.PLAIN
        if confidential:
            model_mib = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**20
            _say(
                f"server up on {server.url}: {kind.value} transport, device memory {arena / 2**20:.0f} MiB "
                f"for a {model_mib:.0f} MiB model ({args.offload:.0%} of its layers stream in sealed)"
            )
        with (
            httpx.Client(base_url=server.url, timeout=600.0) as http,
            open_enclave(config, backend=Backend.SIMULATED, cache_dir=cache) as enclave,
        ):
            client = CmifClient(http, enclave, loaded.tokenizer)
            client.provision(use_sealed=False)  # attest every time: the demo shows it
            if confidential:
                groups = CandidateSet.GROUPS
                enclave.enable_sanitizer(
                    loaded.tokenizer, epsilon=args.epsilon, candidates=groups, progress=tqdm_progress()
                )
                _say("enclave attested (SIMULATED platform: no hardware isolation) and provisioned")
                print("answer: ", end="", flush=True)
            client.generate(WARMUP_TEXT, max_tokens=WARMUP_TOKENS, sanitize=False)  # untimed
            sent = time.perf_counter()
            answer = client.generate(
                prompt,
                max_tokens=args.max_tokens,
                on_token=(lambda _, text: print(text, end="", flush=True)) if confidential else None,
                sanitize=confidential,
            )
            seconds = time.perf_counter() - sent
            if confidential:
                print(flush=True)
        transport = service.loop.call(service.engine.runner.transport.stats)
    return Served(answer, seconds, transport, arena)


def _report(loaded: LoadedModel, confidential: Served, baseline: Served, total_s: float) -> None:
    sanitized = confidential.answer.sanitized
    tokenizer = loaded.tokenizer
    _say("what protected what:")
    replaced = [
        f"{tokenizer.decode(list(before)).strip()!r}->"
        f"{tokenizer.decode([sanitized.token_ids[pos]]).strip()!r}"
        for before, pos in zip(sanitized.originals, sanitized.replaced_positions, strict=True)
    ]
    print(
        f"  CMIF (DP token replacement in the enclave): {len(replaced)} of {len(sanitized.token_ids)} "
        f"prompt tokens replaced, epsilon spent {sanitized.epsilon_spent:g}; the server saw embeddings "
        f"of the sanitized prompt only ({', '.join(replaced[:6])}{' ...' if len(replaced) > 6 else ''})",
        file=sys.stderr,
    )
    stats = confidential.transport
    if stats.sealed is not None:
        print(
            f"  sealed channel (AES-256-GCM, counter IVs): "
            f"{stats.sealed.h2d.plaintext_bytes / 2**20:.0f} MiB sealed host-to-device in "
            f"{stats.sealed.h2d.messages} messages, "
            f"{stats.sealed.d2h.plaintext_bytes / 2**20:.1f} MiB device-to-host, "
            f"{stats.sealed.integrity_failures} integrity failures",
            file=sys.stderr,
        )
    if stats.pipellm is not None:
        spec = stats.pipellm.speculator
        rate = spec.hits / spec.requests if spec.requests else 0.0
        print(
            f"  PipeLLM: {spec.hits} of {spec.requests} chunks pre-sealed and committed (hit rate "
            f"{rate:.0%}), {spec.bytes_sealed_ahead / 2**20:.0f} MiB sealed ahead; its governors measured "
            f"{stats.pipellm.governor.windows} windows and switched mode {stats.pipellm.governor.switches} "
            f"times ({_by_phase(stats.pipellm.governor_by_phase)}; each phase seals in the caller when "
            "speculating does not pay there on this machine); trying the other mode cost "
            f"{stats.pipellm.governor.explore_excess_s:.2f} s beyond the mode that held",
            file=sys.stderr,
        )
    tokens = len(confidential.answer.token_ids)
    conf_rate = tokens / confidential.seconds
    plain_rate = len(baseline.answer.token_ids) / baseline.seconds
    same = confidential.answer.token_ids == baseline.answer.token_ids
    print(
        f"  cost: {conf_rate:.2f} tokens/s confidential vs {plain_rate:.2f} tokens/s with nothing sealed "
        "(same server otherwise, measured in this job after an untimed warm-up request): "
        f"overhead {1 - conf_rate / plain_rate:.0%}; "
        f"answers {'identical' if same else 'DIFFERENT'}",
        file=sys.stderr,
    )
    print(f"  done in {total_s:.0f} s; both servers shut down", file=sys.stderr)


def _by_phase(governors: dict[str, GovernorStats]) -> str:
    """Each phase whose governor measured a window, as `prefill: 7 windows, 3 switches, decode: ...`."""
    return ", ".join(
        f"{phase}: {g.windows} windows, {g.switches} switches" for phase, g in governors.items() if g.windows
    )


def _say(message: str) -> None:
    print(f"veil: {message}", file=sys.stderr, flush=True)
