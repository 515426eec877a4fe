"""Where the runner gets its weights: a `WeightSource`. Today: resident in the device arena.

The runner asks for one layer's weights at a time (`layer(i)`), so a source that streams layers in
through the transport (weight offloading) can replace `ResidentWeights` without touching the runner.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

import torch

from veil.cc.device import DeviceBuffer
from veil.model.llama import LayerWeights, Llama
from veil.transport.base import Transport


class WeightSource(Protocol):
    """Device tensors the runner computes with."""

    embedding: torch.Tensor  # (vocab, hidden)
    norm: torch.Tensor  # (hidden,) final RMSNorm
    head: torch.Tensor  # (vocab, hidden) output projection (the embedding when tied)

    def layer(self, index: int) -> LayerWeights: ...


class ResidentWeights:
    """Every weight of `model` copied once into the device arena through `transport`.

    A context manager: leaving (or `close()`) frees the device memory.

    Raises:
        DeviceOutOfMemory: if the arena cannot hold the model.
    """

    def __init__(self, model: Llama, transport: Transport) -> None:
        self._buffers: list[DeviceBuffer] = []
        self._transport = transport
        try:
            self.embedding = self._upload(model.embed_tokens.weight)
            self.norm = self._upload(model.norm_weight)
            tied = model.lm_head_weight is None
            self.head = self.embedding if tied else self._upload(model.head_weight)
            self._layers = [self._upload_layer(layer.weights(), model) for layer in model.layers]
        except BaseException:
            self.close()
            raise

    @staticmethod
    def device_bytes(model: Llama) -> int:
        """Arena bytes the resident weights take."""
        tied = model.lm_head_weight is None
        return sum(
            p.numel() * p.element_size()
            for name, p in model.named_parameters()
            if not (tied and name == "lm_head_weight")
        )

    def layer(self, index: int) -> LayerWeights:
        return self._layers[index]

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._transport.upload(tensor.detach().contiguous())
        self._buffers.append(buffer)
        return buffer.tensor

    def _upload_layer(self, weights: LayerWeights, model: Llama) -> LayerWeights:
        flat = torch.empty(LayerWeights.numel(model.config))
        weights.copy_to_flat(flat)
        return LayerWeights.view_flat(self._upload(flat), model.config)

    def close(self) -> None:
        """Free every device buffer (idempotent)."""
        for buffer in self._buffers:
            buffer.free()
        self._buffers.clear()

    def __enter__(self) -> ResidentWeights:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
