"""A LoRA adapter in host memory: its hyper-parameters and its A/B matrices, keyed by (layer, target).

`Adapter.pack(layout)` writes it into the flat slot layout (`veil.lora.layout`), the one contiguous
tensor a device slot receives; `random_adapter` makes seeded adapters for tests and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from veil.errors import UsageError
from veil.lora.layout import FIELD_OF, TARGETS, SlotLayout, target_shape
from veil.model.config import ModelConfig


class AdapterError(UsageError):
    """A LoRA adapter that is malformed or does not fit the base model or the adapter bank."""


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter for one base model: delta W_t = scaling * B_t @ A_t on each adapted (layer, target).

    Attributes:
        rank: r, rows of every A.
        alpha: lora_alpha; scaling is alpha / r (alpha / sqrt(r) with `use_rslora`).
        weights: (layer, target) -> (A (r, in_features), B (out_features, r)), float32 CPU.
        use_rslora: rank-stabilised scaling.
    """

    rank: int
    alpha: float
    weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def targets(self) -> tuple[str, ...]:
        """Adapted targets, in canonical order."""
        present = {target for _, target in self.weights}
        return tuple(t for t in TARGETS if t in present)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.weights}))

    def check(self, config: ModelConfig) -> None:
        """Raise `AdapterError` unless every matrix has the shape `config` implies for rank `rank`."""
        if self.rank < 1:
            raise AdapterError(f"rank must be >= 1, got {self.rank}")
        for (layer, target), (a, b) in self.weights.items():
            if target not in FIELD_OF:
                raise AdapterError(f"unknown target module {target!r}; supported: {', '.join(TARGETS)}")
            if not 0 <= layer < config.num_layers:
                raise AdapterError(
                    f"layer {layer} out of range: the base model has {config.num_layers} layers"
                )
            in_features, start, end = target_shape(config, target)
            for what, got, want in (("A", a, (self.rank, in_features)), ("B", b, (end - start, self.rank))):
                if tuple(got.shape) != want:
                    raise AdapterError(
                        f"layer {layer} {target} lora_{what} has shape {tuple(got.shape)}, the base model "
                        f"needs {want} at rank {self.rank}: was the adapter trained for another base model?"
                    )

    def pack(self, layout: SlotLayout) -> torch.Tensor:
        """This adapter in `layout` (1-D, `layout.numel` elements, float32), B scaled by `scaling`.

        Raises:
            AdapterError: if the rank exceeds the layout's or a target is not among its targets.
        """
        if self.rank > layout.rank:
            raise AdapterError(f"adapter rank {self.rank} exceeds the bank's maximum rank {layout.rank}")
        missing = [t for t in self.targets if t not in layout.targets]
        if missing:
            raise AdapterError(f"adapter targets {missing} are not among the bank's targets {layout.targets}")
        self.check(layout.config)
        flat = torch.zeros(layout.numel)
        r, rank = self.rank, layout.rank
        for (layer, _field), group in layout.groups().items():
            a_all = flat[group.a_offset : group.a_offset + len(group.targets) * rank * group.in_features]
            a_all = a_all.view(len(group.targets) * rank, group.in_features)
            for j, span in enumerate(group.targets):
                pair = self.weights.get((layer, span.target))
                if pair is None:
                    continue
                a, b = pair
                a_all[j * rank : j * rank + r] = a
                b_slot = flat[span.b_offset : span.b_offset + (span.out_end - span.out_start) * rank]
                b_slot.view(span.out_end - span.out_start, rank)[:, :r] = b * self.scaling
        return flat


def random_adapter(
    config: ModelConfig,
    *,
    rank: int,
    alpha: float,
    targets: Iterable[str] = TARGETS,
    layers: Iterable[int] | None = None,
    seed: int,
    std: float = 0.05,
) -> Adapter:
    """A seeded adapter with normal A and B (B non-zero, unlike PEFT's init, so it changes outputs).

    Raises:
        AdapterError: on an unknown target or a layer out of range.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = tuple(range(config.num_layers)) if layers is None else tuple(layers)
    weights = {}
    for layer in chosen:
        for target in targets:
            if target not in FIELD_OF:
                raise AdapterError(f"unknown target module {target!r}; supported: {', '.join(TARGETS)}")
            in_features, start, end = target_shape(config, target)
            a = torch.randn(rank, in_features, generator=generator) * std
            b = torch.randn(end - start, rank, generator=generator) * std
            weights[(layer, target)] = (a, b)
    adapter = Adapter(rank=rank, alpha=alpha, weights=weights)
    adapter.check(config)
    return adapter
