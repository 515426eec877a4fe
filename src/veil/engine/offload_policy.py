"""What an offloaded run keeps on the device and how it streams the rest (FlexGen's policy, for veil)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from veil.errors import UsageError


class HostDtype(enum.Enum):
    """Storage dtype of offloaded weights in host memory (upcast to fp32 on the device)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def torch(self) -> torch.dtype:
        return {HostDtype.FP32: torch.float32, HostDtype.BF16: torch.bfloat16, HostDtype.FP16: torch.float16}[
            self
        ]


@dataclass(frozen=True)
class OffloadPolicy:
    """How weights are split between device and host, and how the host part is streamed."""

    resident_fraction: float = 0.0  # share of decoder layers whose weights stay on the device (first ones)
    host_dtype: HostDtype = HostDtype.FP32  # bf16/fp16 halve the bytes to seal, at a precision cost
    batch_size: int = 8  # prompts decoded together; more compute per streamed byte
    prefetch_layers: int = 1  # layers in flight ahead of the one computing (1 = overlap j+1 with j)
    hint_transport: bool = False  # name upcoming layer loads to the transport (PipeLLM's explicit
    # hints); off by default: a speculative transport learns the cyclic order from the loads alone

    def __post_init__(self) -> None:
        if not 0.0 <= self.resident_fraction <= 1.0:
            raise UsageError(f"resident_fraction must be in [0, 1], got {self.resident_fraction}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prefetch_layers < 1:
            raise UsageError(f"prefetch_layers must be >= 1, got {self.prefetch_layers}")

    def resident_layers(self, num_layers: int) -> int:
        """How many of the first decoder layers stay on the device."""
        return round(self.resident_fraction * num_layers)
