"""A paged KV cache: keys and values in fixed-size blocks that block tables name, per sequence.

`decoder_layer` runs unchanged over a batch of sequences of different lengths: `PagedKVCache.update`
writes each row's new keys/values into its blocks and returns every row's gathered context, padded to
the longest; `paged_context` builds the rotary tables and the mask that hides padding and the future.

Storage is block-major, one tensor `(num_blocks, num_layers, 2, block_size, kv_heads, head_dim)`, so one
block's keys and values of every layer are one contiguous byte range (one transfer to swap it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from veil.model.config import ModelConfig
from veil.model.llama import StepContext
from veil.model.rope import Rotary


def paged_storage_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """(num_blocks, num_layers, 2, block_size, kv_heads, head_dim): index 0 of the third axis is K."""
    return (num_blocks, config.num_layers, 2, block_size, config.num_kv_heads, config.head_dim)


@dataclass(frozen=True)
class PagedBatch:
    """Where each of B rows reads and writes: row b computes tokens at positions starts[b] + [0, T)."""

    positions: torch.Tensor  # (B, T) absolute position of each query; padding continues counting
    valid: torch.Tensor  # (B, T) bool: False for padding past a row's new tokens
    block_tables: torch.Tensor  # (B, max_blocks) long; padded with block 0, which the mask hides
    context_lens: torch.Tensor  # (B,) positions each row holds after this step
    block_size: int

    @classmethod
    def build(
        cls, starts: Sequence[int], lengths: Sequence[int], tables: Sequence[Sequence[int]], block_size: int
    ) -> PagedBatch:
        """Rows computing `lengths[b]` tokens after `starts[b]` cached ones, over block `tables[b]`."""
        steps = torch.arange(max(lengths))  # (T,)
        start = torch.tensor(starts)  # (B,)
        length = torch.tensor(lengths)  # (B,)
        table = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.long)  # (B, max_blocks)
        for row, blocks in enumerate(tables):
            table[row, : len(blocks)] = torch.tensor(blocks)
        return cls(start[:, None] + steps, steps < length[:, None], table, start + length, block_size)

    @property
    def num_keys(self) -> int:
        """Key positions each row's gathered context spans (padded): max_blocks * block_size."""
        return self.block_tables.shape[1] * self.block_size

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block id and offset of every valid new token, each (N,), in row-major order."""
        positions = self.positions[self.valid]  # (N,)
        rows = self.valid.nonzero()[:, 0]  # (N,)
        return self.block_tables[rows, positions // self.block_size], positions % self.block_size


class PagedKVCache:
    """The `LayerKV` of one forward step over block-major `storage` (see `paged_storage_shape`)."""

    def __init__(self, storage: torch.Tensor, batch: PagedBatch) -> None:
        self.storage = storage
        self.batch = batch
        self._blocks, self._offsets = batch.slots()

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values (B, KV, T, hd) of valid positions; return contexts (B, KV, S, hd)."""
        new = torch.stack((keys, values), dim=1).permute(0, 3, 1, 2, 4)  # (B, T, 2, KV, hd)
        self.storage[self._blocks, layer, :, self._offsets] = new[self.batch.valid]  # (N, 2, KV, hd)
        gathered = self.storage[self.batch.block_tables, layer]  # (B, max_blocks, 2, bs, KV, hd)
        batch, blocks, _, block_size, kv_heads, head_dim = gathered.shape
        kv = gathered.transpose(1, 2).reshape(
            batch, 2, blocks * block_size, kv_heads, head_dim
        )  # (B,2,S,KV,hd)
        kv = kv.transpose(2, 3)  # (B, 2, KV, S, hd)
        return kv[:, 0], kv[:, 1]


def paged_context(rotary: Rotary, batch: PagedBatch, cache: PagedKVCache) -> StepContext:
    """Rotary tables for the batch's positions and a mask (B, 1, T, S): a query sees the keys at or
    before its position that its row holds. Every query sees key 0, so no row is fully masked."""
    cos, sin = rotary.tables(batch.positions)
    keys = torch.arange(batch.num_keys)  # (S,)
    causal = keys[None, None, :] <= batch.positions[:, :, None]  # (B, T, S)
    held = keys[None, None, :] < batch.context_lens[:, None, None]  # (B, 1, S)
    return StepContext(cos, sin, (causal & held).unsqueeze(1), False, cache)
