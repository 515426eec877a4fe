"""Batched LoRA on veil's fused projections, each row of a batch with its own adapter (or none).

`lora_projection` returns the `Projection` that `veil.model.llama.decoder_layer` calls for every
linear map of a layer: the base `F.linear(h, w)` plus, for the rows that use an adapter,
`scaling * B_t @ A_t @ h` added to the output columns of each adapted target t (q/k/v inside `wqkv`,
gate/up inside `w_gate_up`). Rows are grouped by adapter: one matmul with the stacked A of a fused
projection for each adapter in the batch, then one per target with its B. A per-row gather of A/B
followed by `bmm` was measured against it and was slower on this CPU (docs/lora.md,
`veil.lora.bench`); rows without an adapter cost nothing beyond the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from veil.lora.layout import GroupSpan, SlotLayout
from veil.model.llama import LayerWeights, Projection


@dataclass(frozen=True)
class LoraBatch:
    """Which slot of a bank's table each row of one batch uses (made by `DeviceAdapterBank.batch`).

    Attributes:
        layout: the slot layout of the table.
        table: (num_slots, layout.numel) device tensor, the adapter slots.
        row_slots: per row, its adapter's slot, or None for the base model.
        groups: (slot, rows) for each slot used; rows is None when the slot's rows are the whole batch.
    """

    layout: SlotLayout
    table: torch.Tensor
    row_slots: tuple[int | None, ...]
    groups: tuple[tuple[int, torch.Tensor | None], ...]

    @classmethod
    def of(cls, layout: SlotLayout, table: torch.Tensor, row_slots: Sequence[int | None]) -> LoraBatch:
        """Group the rows by slot.

        Raises:
            ValueError: if a slot is outside the table.
        """
        bad = [s for s in row_slots if s is not None and not 0 <= s < table.shape[0]]
        if bad:
            raise ValueError(f"slots {bad} outside a table of {table.shape[0]} slots")
        used = sorted({s for s in row_slots if s is not None})
        if used and len(used) == 1 and None not in row_slots:
            groups: tuple[tuple[int, torch.Tensor | None], ...] = ((used[0], None),)
        else:
            groups = tuple(
                (slot, torch.tensor([i for i, s in enumerate(row_slots) if s == slot])) for slot in used
            )
        return cls(layout, table, tuple(row_slots), groups)


def lora_projection(weights: LayerWeights, layer: int, batch: LoraBatch) -> Projection:
    """The `Projection` of layer `layer` with base weights `weights` and the adapters of `batch`.

    Inputs are (B, T, in_features) with B = len(batch.row_slots); outputs are the fused projection's
    (B, T, out_features), exactly the base model's for rows whose slot is None.

    Raises (from the projection):
        ValueError: if the input's row count is not the batch's.
    """

    def project(h: torch.Tensor, name: str) -> torch.Tensor:
        if h.shape[0] != len(batch.row_slots):
            raise ValueError(f"input has {h.shape[0]} rows, the LoRA batch {len(batch.row_slots)}")
        out = F.linear(h, getattr(weights, name))  # (B, T, out)
        group = batch.layout.group(layer, name)
        if group is not None:
            add_lora(out, h, batch, group)
        return out

    return project


def add_lora(out: torch.Tensor, h: torch.Tensor, batch: LoraBatch, group: GroupSpan) -> None:
    """out[rows, :, cols_t] += h[rows] @ A_t.T @ B_t.T for every adapter's rows and target t, in place."""
    rank, stacked = batch.layout.rank, len(group.targets) * batch.layout.rank
    for slot, rows in batch.groups:
        weights = batch.table[slot]  # (numel,) this adapter's slot
        a = weights[group.a_offset : group.a_offset + stacked * group.in_features].view(stacked, -1)
        x = (h if rows is None else h.index_select(0, rows)).to(a.dtype)  # (b, T, in)
        u = F.linear(x, a)  # (b, T, n_targets * rank)
        for j, span in enumerate(group.targets):
            width = span.out_end - span.out_start
            b = weights[span.b_offset : span.b_offset + width * rank].view(width, rank)
            delta = F.linear(u[..., j * rank : (j + 1) * rank], b).to(out.dtype)  # (b, T, out_t)
            cols = out[..., span.out_start : span.out_end]
            if rows is None:
                cols += delta
            else:
                cols.index_add_(0, rows, delta)
