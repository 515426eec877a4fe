"""The Llama-family decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

The math lives in functions that take their weights as arguments (`decoder_layer`, `rms_norm`), so a
caller may run one layer at a time with weights it streamed in from elsewhere. `Llama` holds resident
weights and runs the embedding, the decoder stack and the head separately or together.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from veil.model.config import ModelConfig
from veil.model.kv_cache import KVCache, LayerKV
from veil.model.rope import Rotary, apply_rotary


@dataclass
class LayerWeights:
    """The tensors of one decoder layer. q/k/v and gate/up are stored fused (one matmul each)."""

    attn_norm: torch.Tensor  # (hidden,)
    wqkv: torch.Tensor  # (q_size + 2 * kv_size, hidden): rows of q, then k, then v
    wo: torch.Tensor  # (hidden, q_size)
    mlp_norm: torch.Tensor  # (hidden,)
    w_gate_up: torch.Tensor  # (2 * intermediate, hidden): rows of gate, then up
    w_down: torch.Tensor  # (hidden, intermediate)

    @staticmethod
    def shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Shape of each field for `config`, in field order."""
        d, qkv = config.hidden_size, config.q_size + 2 * config.kv_size
        return {
            "attn_norm": (d,),
            "wqkv": (qkv, d),
            "wo": (d, config.q_size),
            "mlp_norm": (d,),
            "w_gate_up": (2 * config.intermediate_size, d),
            "w_down": (d, config.intermediate_size),
        }

    @staticmethod
    def numel(config: ModelConfig) -> int:
        """Elements of one layer's weights, all fields together."""
        return sum(_prod(shape) for shape in LayerWeights.shapes(config).values())

    @classmethod
    def view_flat(cls, flat: torch.Tensor, config: ModelConfig) -> LayerWeights:
        """Views into a contiguous 1-D tensor of `numel(config)` elements (no copy)."""
        if flat.dim() != 1 or flat.numel() != cls.numel(config):
            raise ValueError(f"flat layer buffer must be 1-D with {cls.numel(config)} elements")
        parts, offset = {}, 0
        for name, shape in cls.shapes(config).items():
            size = _prod(shape)
            parts[name] = flat[offset : offset + size].view(shape)
            offset += size
        return cls(**parts)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def copy_to_flat(self, flat: torch.Tensor) -> None:
        """Write all fields, in order, into a 1-D tensor laid out as `view_flat` expects."""
        offset = 0
        for tensor in self.tensors():
            flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
            offset += tensor.numel()


@dataclass
class StepContext:
    """What every layer of one forward step shares: rotary tables, the attention mask, the cache."""

    cos: torch.Tensor  # (B, 1, T, head_dim)
    sin: torch.Tensor  # (B, 1, T, head_dim)
    attn_mask: torch.Tensor | None  # (B, 1, T, S) bool, True where a query may attend; None: see is_causal
    is_causal: bool  # no cache history and no padding: plain causal attention
    cache: LayerKV | None  # a contiguous `KVCache`, or a paged one (veil.model.paged)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def lm_head(
    hidden: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Final RMSNorm and output projection: hidden (B, T, hidden) to logits (B, T, vocab)."""
    return F.linear(rms_norm(hidden, norm_weight, eps), weight)


def decoder_layer(
    x: torch.Tensor,
    w: LayerWeights,
    ctx: StepContext,
    layer: int,
    config: ModelConfig,
    project: Projection | None = None,
) -> torch.Tensor:
    """One pre-norm decoder layer on hidden states `x` (B, T, hidden) with weights `w`.

    `project(h, name)` computes the linear map of the `LayerWeights` field `name` ("wqkv", "wo",
    "w_gate_up", "w_down"); by default `F.linear` with `w`'s tensor. A caller that keeps the linear
    weights elsewhere (the per-layer partition baseline of split inference) passes its own.
    """
    if project is None:
        project = functools.partial(_project_local, w)
    batch, seq, _ = x.shape
    h = rms_norm(x, w.attn_norm, config.rms_norm_eps)
    q, k, v = project(h, "wqkv").split([config.q_size, config.kv_size, config.kv_size], dim=-1)
    q = q.view(batch, seq, config.num_heads, config.head_dim).transpose(1, 2)  # (B, H, T, hd)
    k = k.view(batch, seq, config.num_kv_heads, config.head_dim).transpose(1, 2)  # (B, KV, T, hd)
    v = v.view(batch, seq, config.num_kv_heads, config.head_dim).transpose(1, 2)
    q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
    if ctx.cache is not None:
        k, v = ctx.cache.update(layer, k, v)  # (B, KV, S, hd)
    attn = attention(q, k, v, ctx)  # (B, H, T, hd)
    x = x + project(attn.transpose(1, 2).reshape(batch, seq, config.q_size), "wo")
    h = rms_norm(x, w.mlp_norm, config.rms_norm_eps)
    gate, up = project(h, "w_gate_up").chunk(2, dim=-1)
    return x + project(F.silu(gate) * up, "w_down")


Projection = Callable[[torch.Tensor, str], torch.Tensor]


def _project_local(w: LayerWeights, h: torch.Tensor, name: str) -> torch.Tensor:
    return F.linear(h, getattr(w, name))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads: q (B, H, T, hd), k/v (B, KV, S, hd)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, is_causal=ctx.is_causal)


class DecoderLayer(nn.Module):
    """Resident weights of one layer, laid out as `LayerWeights`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        for name, shape in LayerWeights.shapes(config).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape), requires_grad=False))

    def weights(self) -> LayerWeights:
        return LayerWeights(**{name: param for name, param in self.named_parameters()})


class Llama(nn.Module):
    """A Llama-family causal LM. `forward` = `head(run_layers(embed(ids)))`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=_empty(config))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm_weight = nn.Parameter(torch.empty(config.hidden_size), requires_grad=False)
        self.lm_head_weight: nn.Parameter | None = None
        if not config.tie_word_embeddings:
            self.lm_head_weight = nn.Parameter(_empty(config), requires_grad=False)
        self.rotary = Rotary(config, max_positions=min(config.max_position_embeddings, 4096))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) to hidden states (B, T, hidden)."""
        return self.embed_tokens(token_ids)

    def context(
        self, batch_size: int, seq_len: int, cache: KVCache | None, pad: torch.Tensor | None = None
    ) -> StepContext:
        """Rotary tables and mask for a step of `seq_len` new positions after what `cache` holds.

        `pad` (B,) counts left-padding positions per row; those keys are never attended and
        positions count from the first real token, as in Hugging Face's left-padded batches.
        """
        start = cache.length if cache is not None else 0
        absolute = torch.arange(start, start + seq_len).expand(batch_size, seq_len)  # (B, T)
        positions = absolute if pad is None else (absolute - pad[:, None]).clamp(min=0)
        cos, sin = self.rotary.tables(positions)
        if start == 0 and pad is None:
            return StepContext(cos, sin, None, seq_len > 1, cache)
        if seq_len == 1 and pad is None:
            return StepContext(cos, sin, None, False, cache)
        keys = torch.arange(start + seq_len)  # (S,)
        mask = keys[None, None, :] <= absolute[:, :, None]  # (B, T, S) causal
        if pad is not None:
            # Real tokens never see padding; a padding query sees only itself (an all-masked row would
            # give NaN, and NaN times a zero attention weight still poisons later rows).
            real = keys[None, None, :] >= pad[:, None, None]
            mask = mask & (real | (keys[None, None, :] == absolute[:, :, None]))
        return StepContext(cos, sin, mask.unsqueeze(1), False, cache)

    def run_layer(
        self, layer: int, hidden: torch.Tensor, ctx: StepContext, weights: LayerWeights
    ) -> torch.Tensor:
        return decoder_layer(hidden, weights, ctx, layer, self.config)

    def run_layers(self, hidden: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The whole decoder stack with the resident weights."""
        for index, layer in enumerate(self.layers):
            hidden = decoder_layer(hidden, layer.weights(), ctx, index, self.config)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: hidden (B, T, hidden) to logits (B, T, vocab)."""
        return lm_head(hidden, self.norm_weight, self.head_weight, self.config.rms_norm_eps)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection (vocab, hidden): the embedding matrix when tied."""
        return self.embed_tokens.weight if self.lm_head_weight is None else self.lm_head_weight

    def new_cache(self, batch_size: int, max_tokens: int) -> KVCache:
        return KVCache(self.config, batch_size, max_tokens)

    def forward(
        self, token_ids: torch.Tensor, cache: KVCache | None = None, pad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T), appending to `cache` if given."""
        batch, seq = token_ids.shape
        ctx = self.context(batch, seq, cache, pad)
        logits = self.head(self.run_layers(self.embed(token_ids), ctx))
        if cache is not None:
            cache.advance(seq)
        return logits


def _empty(config: ModelConfig) -> torch.Tensor:
    return torch.empty(config.vocab_size, config.hidden_size)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out
