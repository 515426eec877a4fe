"""A key/value cache with preallocated storage: one write per layer per step, no concatenation."""

from __future__ import annotations

from typing import Protocol

import torch

from veil.model.config import ModelConfig


class LayerKV(Protocol):
    """What `decoder_layer` needs of a cache: store a step's keys/values, return all it may attend to."""

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class KVCache:
    """Keys and values of every layer for a batch of `batch_size` rows, up to `max_tokens` positions.

    All rows advance together: `length` is the number of positions filled (padding included). A step
    writes its T new positions with `update` for each layer, then calls `advance(T)` once.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_tokens: int,
        dtype: torch.dtype = torch.float32,
        storage: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Allocate zeroed storage, or use `storage` (keys, values), each shaped as `shape()` says."""
        shape = self.shape(config, batch_size, max_tokens)
        if storage is None:
            storage = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
        if any(tuple(t.shape) != shape for t in storage):
            raise ValueError(f"KV storage must be two tensors of shape {shape}")
        self.keys, self.values = storage
        self.max_tokens = max_tokens
        self.length = 0

    @staticmethod
    def shape(config: ModelConfig, batch_size: int, max_tokens: int) -> tuple[int, int, int, int, int]:
        """(layers, batch, kv_heads, max_tokens, head_dim): the shape of the keys and of the values."""
        return (config.num_layers, batch_size, config.num_kv_heads, max_tokens, config.head_dim)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `keys`/`values` (B, n_kv, T, head_dim) at positions [length, length + T).

        Returns views of all positions so far, (B, n_kv, length + T, head_dim).
        """
        end = self.length + keys.shape[2]
        if end > self.max_tokens:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_tokens} allocated")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
