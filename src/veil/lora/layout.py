"""Where each LoRA target sits in veil's fused weights, and the byte layout of one adapter slot.

veil fuses q/k/v into `LayerWeights.wqkv` and gate/up into `w_gate_up`, so a PEFT target
(`q_proj`, ...) is a row range of one fused projection. `SlotLayout` fixes, for a bank's rank and
targets, where every A and B matrix of every layer lives in one flat tensor: the host copy of an
adapter and a device slot share it, so loading an adapter is one contiguous transfer.

Per layer and per fused projection (in `LayerWeights` field order) that has targets, a slot holds
  A: (n_targets * rank, in_features)   the targets' A matrices stacked (one matmul for all of them)
  B_t: (out_t, rank) for each target t  already multiplied by the adapter's scaling
An adapter of a smaller rank is zero-padded (extra A rows and B columns are zero), and a target or
layer it does not adapt is all zeros, so its delta there is exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.model.config import ModelConfig

# PEFT module names, in the order their rows appear in veil's fused weights.
TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FIELD_OF: dict[str, str] = {
    "q_proj": "wqkv",
    "k_proj": "wqkv",
    "v_proj": "wqkv",
    "o_proj": "wo",
    "gate_proj": "w_gate_up",
    "up_proj": "w_gate_up",
    "down_proj": "w_down",
}
PARENT_OF: dict[str, str] = {t: ("self_attn" if FIELD_OF[t] in ("wqkv", "wo") else "mlp") for t in TARGETS}
FIELDS: tuple[str, ...] = ("wqkv", "wo", "w_gate_up", "w_down")


def target_shape(config: ModelConfig, target: str) -> tuple[int, int, int]:
    """(in_features, first output row, end output row) of `target` inside its fused projection."""
    d, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    rows = {
        "q_proj": (d, 0, q),
        "k_proj": (d, q, q + kv),
        "v_proj": (d, q + kv, q + 2 * kv),
        "o_proj": (q, 0, d),
        "gate_proj": (d, 0, inter),
        "up_proj": (d, inter, 2 * inter),
        "down_proj": (inter, 0, d),
    }
    return rows[target]


@dataclass(frozen=True)
class TargetSpan:
    """One target's B matrix in a slot and the output columns it adds to."""

    target: str
    b_offset: int  # element offset of B (out_t, rank) in the slot
    out_start: int  # first column of the fused projection's output
    out_end: int


@dataclass(frozen=True)
class GroupSpan:
    """The adapted targets of one fused projection of one layer."""

    field: str  # LayerWeights field
    a_offset: int  # element offset of the stacked A (len(targets) * rank, in_features)
    in_features: int
    targets: tuple[TargetSpan, ...]


class SlotLayout:
    """The element layout of one adapter slot for `config`, a bank `rank` and the bank's `targets`.

    Raises:
        ValueError: if rank < 1, targets is empty, or a target is not one of `TARGETS`.
    """

    def __init__(self, config: ModelConfig, *, rank: int, targets: tuple[str, ...]) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown or not targets:
            raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {targets}")
        self.config = config
        self.rank = rank
        self.targets = tuple(t for t in TARGETS if t in targets)  # canonical order
        self._groups: dict[tuple[int, str], GroupSpan] = {}
        offset = 0
        for layer in range(config.num_layers):
            for field in FIELDS:
                group, offset = self._place(layer, field, offset)
                if group is not None:
                    self._groups[(layer, field)] = group
        self.numel = offset  # elements of one slot

    def _place(self, layer: int, field: str, offset: int) -> tuple[GroupSpan | None, int]:
        members = [t for t in self.targets if FIELD_OF[t] == field]
        if not members:
            return None, offset
        in_features = target_shape(self.config, members[0])[0]
        a_offset, offset = offset, offset + len(members) * self.rank * in_features
        spans = []
        for target in members:
            _, start, end = target_shape(self.config, target)
            spans.append(TargetSpan(target, offset, start, end))
            offset += (end - start) * self.rank
        return GroupSpan(field, a_offset, in_features, tuple(spans)), offset

    def group(self, layer: int, field: str) -> GroupSpan | None:
        """The slot's part for projection `field` of `layer`; None if the bank adapts none of its targets."""
        return self._groups.get((layer, field))

    def groups(self) -> dict[tuple[int, str], GroupSpan]:
        """Every (layer, field) with targets, in slot order."""
        return dict(self._groups)
