"""Where the runner gets its weights: a `WeightSource`, resident or streamed.

The runner asks for one layer's weights at a time (`layer(i)`), runs every batch of the step through
that layer, then hands it back (`release(i)`). `ResidentWeights` keeps every weight in the device arena
(uploaded once through the transport). `StreamedWeights` is weight offloading (FlexGen's workload,
PipeLLM's first): the embedding, final norm, head and the first resident layers live on the device;
the other decoder layers live in host memory and stream in through the transport just before they run.

Shape of a streamed forward pass, for L layers of which the first R are resident:
- prologue: the loads of the first `prefetch_layers` offloaded layers are already in flight (issued at
  the end of the previous step, or at start-up);
- steady state: asked for layer j, the source issues the load of the layer `prefetch_layers` ahead (in
  cyclic layer order, so the end of one step prefetches the start of the next), waits for j's weights
  and returns them; `release(j)` frees them from the arena;
- epilogue: `close()` waits for what is still in flight and frees it.

Only `transport.h2d` moves the weights: `plain`, `cc` and `pipellm` all apply, and a speculative
transport learns the cyclic layer order from the loads alone (or from hints, if the policy asks).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import torch

from veil.cc.device import DeviceBuffer
from veil.cc.host import HostBuffer
from veil.cc.stream import Event
from veil.engine.offload_policy import HostDtype, OffloadPolicy
from veil.model.config import ModelConfig
from veil.model.llama import LayerWeights, Llama
from veil.transport.base import Transport

_HINT_LAYERS = 2  # how far ahead (in layer loads) hints run when the policy asks for them


def compute_threads_beside_device() -> int:
    """Torch threads to give layer compute while an emulated device runs: all cores but one.

    The emulated copy engine opens every sealed message on a host core (a real H100 does this in
    hardware). Letting torch's intra-op pool also claim that core oversubscribes the machine, and its
    spinning worker threads then slow compute several-fold (measured here: 5x on 2 cores).
    """
    return max(1, (os.cpu_count() or 1) - 1)


class WeightSource(Protocol):
    """Device tensors the runner computes with."""

    embedding: torch.Tensor  # (vocab, hidden)
    norm: torch.Tensor  # (hidden,) final RMSNorm
    head: torch.Tensor  # (vocab, hidden) output projection (the embedding when tied)

    def layer(self, index: int) -> LayerWeights:
        """Layer `index`'s weights on the device (for a streamed layer: waits for its load)."""
        ...

    def release(self, index: int) -> None:
        """The step is done with layer `index` (a streamed layer's buffer is freed)."""
        ...


class ResidentWeights:
    """The weights of `model` copied once into the device arena through `transport`: the embedding,
    final norm, head and the first `layers` decoder layers (default: all).

    A context manager: leaving (or `close()`) frees the device memory.

    Raises:
        DeviceOutOfMemory: if the arena cannot hold them.
    """

    def __init__(self, model: Llama, transport: Transport, *, layers: int | None = None) -> None:
        self.num_layers = model.config.num_layers if layers is None else layers
        self._buffers: list[DeviceBuffer] = []
        self._transport = transport
        try:
            self.embedding = self._upload(model.embed_tokens.weight)
            self.norm = self._upload(model.norm_weight)
            tied = model.lm_head_weight is None
            self.head = self.embedding if tied else self._upload(model.head_weight)
            self._layers = [
                self._upload_layer(layer.weights(), model) for layer in model.layers[: self.num_layers]
            ]
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

    def release(self, index: int) -> None:
        pass

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


@dataclass
class StreamStats:
    """Where the time of streamed layers went."""

    layers_streamed: int = 0  # layer loads completed
    bytes_streamed: int = 0  # bytes moved host-to-device for streamed layers
    issue_s: float = 0.0  # time spent issuing loads (a `cc` transport seals in the caller here)
    wait_s: float = 0.0  # time the runner waited for weights to arrive


@dataclass
class _InFlight:
    layer: int
    staging: DeviceBuffer
    event: Event


class StreamedWeights:
    """Weights of `model` split by `policy` between the device arena and host memory (see the module
    docstring). A context manager: leaving (or `close()`) drains the loads in flight and frees every
    device allocation.

    Raises:
        DeviceOutOfMemory: if the arena cannot hold the resident part.
    """

    def __init__(self, model: Llama, transport: Transport, policy: OffloadPolicy) -> None:
        self.config = model.config
        self.policy = policy
        self.stats = StreamStats()
        self._transport = transport
        resident = ResidentWeights(model, transport, layers=policy.resident_layers(model.config.num_layers))
        self._resident = resident
        self.embedding, self.norm, self.head = resident.embedding, resident.norm, resident.head
        self._offloaded = list(range(self._resident.num_layers, model.config.num_layers))
        self._host = {layer: self._stage(model, layer) for layer in self._offloaded}
        self._inflight: deque[_InFlight] = deque()
        self._arrived: dict[int, list[DeviceBuffer]] = {}  # layer -> buffers to free on release
        self._issued = 0  # loads issued so far; the next is self._offloaded[_issued % len] (cyclic)
        self._hinted = 0  # loads hinted so far

    @staticmethod
    def device_bytes(config: ModelConfig, policy: OffloadPolicy) -> int:
        """Arena bytes at peak: the resident part, `prefetch_layers + 1` layers in flight in the host
        dtype, and one fp32 upcast buffer when the host dtype is not fp32."""
        layer_numel = LayerWeights.numel(config)
        resident_layers = policy.resident_layers(config.num_layers)
        resident = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
        resident += config.hidden_size + resident_layers * layer_numel
        streamed = config.num_layers - resident_layers
        in_flight = 0
        if streamed:
            host_bytes = torch.empty((), dtype=policy.host_dtype.torch).element_size()
            in_flight = min(policy.prefetch_layers + 1, streamed) * layer_numel * host_bytes
            in_flight += 0 if policy.host_dtype is HostDtype.FP32 else layer_numel * 4
        return 4 * resident + in_flight

    def layer(self, index: int) -> LayerWeights:
        if index < self._resident.num_layers:
            return self._resident.layer(index)
        self._issue_ahead()
        entry = self._inflight.popleft()
        assert entry.layer == index, f"layers out of order: expected {entry.layer}, asked for {index}"
        start = time.perf_counter()
        try:
            entry.event.wait()
        except BaseException:
            entry.staging.free()
            raise
        self.stats.wait_s += time.perf_counter() - start
        self.stats.layers_streamed += 1
        self.stats.bytes_streamed += entry.staging.nbytes
        if entry.staging.dtype == torch.float32:
            self._arrived[index] = [entry.staging]
            return LayerWeights.view_flat(entry.staging.tensor, self.config)
        try:
            work = self._transport.device.empty(tuple(entry.staging.shape), torch.float32)
        except BaseException:
            entry.staging.free()
            raise
        work.tensor.copy_(entry.staging.tensor)  # upcast on the device
        entry.staging.free()
        self._arrived[index] = [work]
        return LayerWeights.view_flat(work.tensor, self.config)

    def release(self, index: int) -> None:
        for buffer in self._arrived.pop(index, []):
            buffer.free()

    def close(self) -> None:
        """Wait for loads in flight, then free every device allocation (idempotent)."""
        while self._inflight:
            entry = self._inflight.popleft()
            try:
                entry.event.wait()
            finally:
                entry.staging.free()
        for index in list(self._arrived):
            self.release(index)
        self._resident.close()

    def __enter__(self) -> StreamedWeights:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _stage(self, model: Llama, layer: int) -> HostBuffer:
        flat = torch.empty(LayerWeights.numel(self.config), dtype=self.policy.host_dtype.torch)
        model.layers[layer].weights().copy_to_flat(flat)
        return HostBuffer(flat)

    def _issue_ahead(self) -> None:
        """Keep `prefetch_layers` + 1 offloaded layers in flight, in cyclic layer order."""
        while len(self._inflight) < min(self.policy.prefetch_layers + 1, len(self._offloaded)):
            layer = self._offloaded[self._issued % len(self._offloaded)]
            self._issued += 1
            source = self._host[layer]
            staging = self._transport.device.empty((source.tensor.numel(),), source.tensor.dtype)
            start = time.perf_counter()
            try:
                event = self._transport.h2d(source, staging)
            except BaseException:
                staging.free()
                raise
            self.stats.issue_s += time.perf_counter() - start
            self._inflight.append(_InFlight(layer, staging, event))
            if self.policy.hint_transport:
                self._hint_ahead()

    def _hint_ahead(self) -> None:
        """Hint the loads `_HINT_LAYERS` beyond the last one issued (each layer once per cycle)."""
        while self._hinted < self._issued + _HINT_LAYERS:
            layer = self._offloaded[self._hinted % len(self._offloaded)]
            self._transport.hint(self._host[layer])
            self._hinted += 1
