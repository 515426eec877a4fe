"""Rotary position embeddings, with the Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch

from veil.model.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair rotation frequencies, shape (head_dim // 2,), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, the band between
    # interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary:
    """cos/sin tables for positions, computed once up to `max_positions` and grown on demand."""

    def __init__(self, config: ModelConfig, max_positions: int = 4096) -> None:
        self._inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)
        self._build(max_positions)

    def _build(self, num_positions: int) -> None:
        t = torch.arange(num_positions, dtype=torch.float32)
        freqs = torch.outer(t, self._inv_freq)  # (P, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, head_dim)
        self._cos, self._sin = emb.cos(), emb.sin()

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for integer `positions` (B, T), each shaped (B, 1, T, head_dim) for broadcasting."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._cos.shape[0]:
            self._build(max(needed, 2 * self._cos.shape[0]))
        return self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of `x` (B, H, T, head_dim) by the position angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
