"""Hugging Face Llama checkpoint keys to veil's layout: the one place where keys are renamed."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from veil.model.config import ModelConfig
from veil.model.llama import Llama

_PREFIX = "model."


def from_hf_state(hf: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename and fuse a transformers `LlamaForCausalLM` state dict into `Llama`'s parameter names."""

    def get(key: str) -> torch.Tensor:
        for name in (_PREFIX + key, key):
            if name in hf:
                return hf[name].to(torch.float32)
        raise KeyError(f"checkpoint has no tensor {_PREFIX + key!r}")

    state = {"embed_tokens.weight": get("embed_tokens.weight"), "norm_weight": get("norm.weight")}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        state[p + "attn_norm"] = get(p + "input_layernorm.weight")
        state[p + "wqkv"] = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        state[p + "wo"] = get(p + "self_attn.o_proj.weight")
        state[p + "mlp_norm"] = get(p + "post_attention_layernorm.weight")
        state[p + "w_gate_up"] = torch.cat([get(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")])
        state[p + "w_down"] = get(p + "mlp.down_proj.weight")
    if not config.tie_word_embeddings:
        if "lm_head.weight" not in hf:
            raise KeyError("untied checkpoint has no 'lm_head.weight'")
        state["lm_head_weight"] = hf["lm_head.weight"].to(torch.float32)
    return state


def build_model(hf: Mapping[str, torch.Tensor], config: ModelConfig) -> Llama:
    """A `Llama` in eval mode holding the weights of a transformers-format state dict."""
    model = Llama(config)
    model.load_state_dict(from_hf_state(hf, config), strict=True)
    return model.eval()
