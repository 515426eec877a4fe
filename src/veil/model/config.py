"""Model configuration read from a Hugging Face `config.json` (Llama family)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.errors import UsageError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling of RoPE (`rope_type == "llama3"`)."""

    factor: float  # how much longer the context is than the one trained on
    low_freq_factor: float  # wavelengths above original_context / low_freq_factor are divided by factor
    high_freq_factor: float  # wavelengths below original_context / high_freq_factor are kept
    original_max_position_embeddings: int  # context length of the original training


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder. Field names follow the model, units are in the names."""

    vocab_size: int  # rows of the embedding table
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the SwiGLU MLP
    num_layers: int  # decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int  # width of one head
    rms_norm_eps: float  # epsilon inside RMSNorm
    rope_theta: float  # RoPE base
    rope_scaling: RopeScaling | None  # Llama-3 scaling, or None for plain RoPE
    max_position_embeddings: int  # longest context the checkpoint supports
    tie_word_embeddings: bool  # the head reuses the embedding matrix
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # any of these ends a generation

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a transformers `LlamaConfig` dict (format of transformers 4.x and 5.x)."""
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise UsageError("checkpoints with attention or MLP biases are not supported")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UsageError(f"hidden_act must be 'silu' for a Llama-family model, got {act!r}")
        rope = dict(raw.get("rope_parameters") or {})
        scaling_raw = raw.get("rope_scaling") or rope
        theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=_parse_scaling(scaling_raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        return cls.from_hf_dict(json.loads(path.read_text()))


def _parse_scaling(raw: dict[str, Any]) -> RopeScaling | None:
    kind = raw.get("rope_type", raw.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "llama3":
        raise UsageError(f"unsupported rope scaling {kind!r} (supported: default, llama3)")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )
