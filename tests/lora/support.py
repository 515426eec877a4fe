"""A tiny random Llama built through transformers (so PEFT can wrap the same weights) and LoRA oracles."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from veil.cc.device import Device
from veil.lora import Adapter, DeviceAdapterBank, LoraBatch, lora_projection
from veil.lora.layout import FIELD_OF, target_shape
from veil.model.checkpoint import build_model
from veil.model.config import ModelConfig
from veil.model.kv_cache import KVCache
from veil.model.llama import Llama, decoder_layer
from veil.pipellm.options import PipeLLMOptions
from veil.transport import TransportKind, make_transport

MiB = 1 << 20
TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def tiny_pair(seed: int = 0) -> tuple[LlamaForCausalLM, Llama]:
    """transformers' model and veil's on the same random weights."""
    torch.manual_seed(seed)
    hf_config = LlamaConfig(**TINY)
    hf = LlamaForCausalLM(hf_config).eval()
    return hf, build_model(hf.state_dict(), ModelConfig.from_hf_dict(hf_config.to_dict()))


def merged(model: Llama, adapter: Adapter) -> Llama:
    """A copy of `model` with W += scaling * B @ A folded into every adapted target's rows."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for (layer, target), (a, b) in adapter.weights.items():
            _, start, end = target_shape(model.config, target)
            weight = getattr(out.layers[layer], FIELD_OF[target])
            weight[start:end] += adapter.scaling * (b @ a)
    return out


def lora_forward(
    model: Llama, ids: torch.Tensor, batch: LoraBatch, cache: KVCache | None = None
) -> torch.Tensor:
    """Logits (B, T, vocab) of `model` with row i using the adapter of `batch.row_slots[i]`."""
    ctx = model.context(*ids.shape, cache)
    hidden = model.embed(ids)
    for index, layer in enumerate(model.layers):
        weights = layer.weights()
        project = lora_projection(weights, index, batch)
        hidden = decoder_layer(hidden, weights, ctx, index, model.config, project=project)
    if cache is not None:
        cache.advance(ids.shape[1])
    return model.head(hidden)


def greedy(
    model: Llama, prompts: torch.Tensor, steps: int, batch: LoraBatch | None = None
) -> list[list[int]]:
    """`steps` greedy tokens per row with a KV cache: prefill, then one-token decode steps."""
    cache = model.new_cache(prompts.shape[0], prompts.shape[1] + steps)
    logits = model(prompts, cache) if batch is None else lora_forward(model, prompts, batch, cache)
    out = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(token)
        logits = model(token, cache) if batch is None else lora_forward(model, token, batch, cache)
    return torch.cat(out, dim=1).tolist()


@contextmanager
def bank_on(
    config: ModelConfig,
    kind: TransportKind = TransportKind.PLAIN,
    *,
    num_slots: int = 4,
    rank: int = 8,
    targets: Sequence[str] | None = None,
    pipellm: PipeLLMOptions | None = None,
) -> Iterator[DeviceAdapterBank]:
    """A bank on a fresh emulated device behind transport `kind`."""
    extra = {} if targets is None else {"targets": targets}
    with (
        Device(capacity_bytes=64 * MiB) as device,
        make_transport(kind, device, pipellm=pipellm) as transport,
    ):
        with DeviceAdapterBank(transport, config, num_slots=num_slots, rank=rank, **extra) as bank:
            yield bank
