"""`veil generate`: stream a completion of one prompt from the bundled or a local model."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from veil.engine.engine import EngineConfig, LLMEngine
from veil.engine.offload_policy import HostDtype, OffloadPolicy
from veil.engine.runner import kv_block_bytes
from veil.engine.weights import compute_threads_beside_device
from veil.errors import UsageError
from veil.model.loader import LoadedModel, load_model
from veil.model.sampling import SamplingParams
from veil.transport.base import TransportKind

BLOCK_SIZE = 16  # tokens per KV block


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text from a prompt")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument(
        "--model", default=None, help="local Hugging Face Llama checkpoint dir (default: bundled)"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    offload = parser.add_argument_group("weight offloading (emulated confidential device)")
    offload.add_argument(
        "--offload",
        type=float,
        default=None,
        metavar="FRACTION",
        help="stream this fraction of the decoder layers from host memory through --transport",
    )
    offload.add_argument(
        "--transport",
        choices=[k.value for k in TransportKind],
        default=TransportKind.PIPELLM.value,
        help="how weights cross to the device (default pipellm)",
    )
    offload.add_argument(
        "--host-dtype",
        choices=[d.value for d in HostDtype],
        default=HostDtype.FP32.value,
        help="storage dtype of offloaded weights (bf16/fp16 halve the bytes to seal)",
    )
    offload.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="MIB",
        help="device arena capacity in MiB (default: just what the run needs)",
    )
    parser.set_defaults(handler=run)


def prompt_token_ids(loaded: LoadedModel, prompt: str, *, chat: bool) -> list[int]:
    """Token ids of `prompt`, wrapped in the chat template (with the assistant turn opened) if `chat`."""
    tokenizer = loaded.tokenizer
    if not chat:
        return list(tokenizer(prompt).input_ids)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("this model's tokenizer has no chat template; drop --chat")
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def run(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.offload is not None and not 0.0 <= args.offload <= 1.0:
        raise UsageError(f"--offload must be a fraction in [0, 1], got {args.offload}")
    loaded = load_model(args.model)
    ids = prompt_token_ids(loaded, args.prompt, chat=args.chat)
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_tokens=max(args.max_tokens, 1),
        stop_token_ids=loaded.stop_token_ids,
    )
    config = engine_config(args, loaded, len(ids) + args.max_tokens)
    if config.offload is not None:
        torch.set_num_threads(compute_threads_beside_device())
    with LLMEngine(loaded.model, config) as engine:
        try:
            engine.add_request(ids, params)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return _emit(args, loaded, engine, ids)


def engine_config(args: argparse.Namespace, loaded: LoadedModel, max_tokens: int) -> EngineConfig:
    """One request's engine: weights resident, or `--offload` of the layers streamed over --transport;
    the arena is `--device-memory` MiB, or just what the weights and this request's KV blocks need."""
    policy = None
    if args.offload is not None:
        policy = OffloadPolicy(resident_fraction=1.0 - args.offload, host_dtype=HostDtype(args.host_dtype))
    blocks = -(-max_tokens // BLOCK_SIZE) + 1
    capacity = None if args.device_memory is None else int(args.device_memory * 2**20)
    config = EngineConfig(
        transport=TransportKind(args.transport),
        block_size=BLOCK_SIZE,
        num_device_blocks=None if capacity is not None else blocks,
        device_memory_bytes=capacity,
        num_host_blocks=0,
        max_num_seqs=1,
        offload=policy,
    )
    try:
        arena, _ = config.geometry(loaded.model)
    except ValueError as exc:
        need = config.weights_bytes(loaded.model) + blocks * kv_block_bytes(loaded.config, BLOCK_SIZE)
        raise UsageError(
            f"--device-memory {args.device_memory} MiB is too small: this run needs {need / 2**20:.1f} MiB "
            f"(raise --offload or the memory) [{exc}]"
        ) from None
    if args.offload is not None:
        print(
            f"veil: offloading {args.offload:.0%} of the layers over {args.transport}; "
            f"device arena {arena / 2**20:.1f} MiB (model weights {_weight_mib(loaded):.1f} MiB)",
            file=sys.stderr,
        )
    return config


def _weight_mib(loaded: LoadedModel) -> float:
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**20


def _emit(args: argparse.Namespace, loaded: LoadedModel, engine: LLMEngine, ids: list[int]) -> int:
    stops = set(loaded.stop_token_ids)
    generated: list[int] = []
    shown = ""
    start = time.perf_counter()
    while args.max_tokens and engine.has_unfinished():
        for out in engine.step():
            generated += [t for t in out.new_token_ids if t not in stops]
        if not args.json:
            text = loaded.tokenizer.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold a character split across tokens
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
    elapsed = time.perf_counter() - start
    text = loaded.tokenizer.decode(generated, skip_special_tokens=True)
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_token_ids": ids,
                    "token_ids": generated,
                    "text": text,
                    "tokens_per_s": len(generated) / elapsed if elapsed > 0 else 0.0,
                }
            )
        )
    else:
        sys.stdout.write(text[len(shown) :] + "\n")
        print(
            f"[{len(generated)} tokens, {len(generated) / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr
        )
    return 0
