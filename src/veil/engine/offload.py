"""Weight offloading (FlexGen's workload): decoder-layer weights live in host memory and stream to the
device through a transport just before each layer runs.

Shape of one decode step, for L layers of which the first R are resident:
- prologue: the loads of the first `prefetch_layers` offloaded layers are already in flight (issued at
  the end of the previous step, or at start-up);
- steady state: before layer j computes, the load of the layer `prefetch_layers` ahead (in cyclic
  layer order, so the end of one step prefetches the start of the next) is issued; then layer j waits
  for its own weights, computes, and frees them from the device arena;
- epilogue: `close()` waits for what is still in flight and frees it.

The runner only ever calls `transport.h2d`: it works unchanged over `plain`, `cc` and `pipellm`, and a
speculative transport learns the cyclic layer order from the requests alone. Everything compute
touches is device memory: the embedding, final norm, resident layers and KV cache are allocated in the
device arena (copied in through the transport at start-up); activations are not accounted.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType

import torch

from veil.cc.device import Device, DeviceBuffer
from veil.cc.host import HostBuffer
from veil.cc.stream import Event
from veil.engine.offload_policy import HostDtype, OffloadPolicy
from veil.model.config import ModelConfig
from veil.model.kv_cache import KVCache
from veil.model.llama import LayerWeights, Llama, StepContext, decoder_layer, lm_head
from veil.transport.base import Transport


def compute_threads_beside_device() -> int:
    """Torch threads to give layer compute while an emulated device runs: all cores but one.

    The emulated copy engine opens every sealed message on a host core (a real H100 does this in
    hardware). Letting torch's intra-op pool also claim that core oversubscribes the machine, and its
    spinning worker threads then slow compute several-fold (measured here: 5x on 2 cores).
    """
    return max(1, (os.cpu_count() or 1) - 1)


_HINT_LAYERS = 2  # how far ahead (in layer loads) hints run when the policy asks for them


@dataclass
class OffloadStats:
    """Where the time of the decoder stack went."""

    layers_streamed: int = 0  # layer loads completed
    bytes_streamed: int = 0  # bytes moved host-to-device for streamed layers
    issue_s: float = 0.0  # time spent issuing loads (a `cc` transport seals in the caller here)
    wait_s: float = 0.0  # time compute waited for weights to arrive
    compute_s: float = 0.0  # time in decoder-layer compute


@dataclass
class _InFlight:
    layer: int
    staging: DeviceBuffer
    event: Event


class OffloadedModel:
    """A `Runner` (see veil.model.generate) whose offloaded layers stream in through `transport`.

    Use as a context manager: entering copies the resident weights to the device, leaving drains
    in-flight loads and frees every device allocation.
    """

    def __init__(self, model: Llama, transport: Transport, policy: OffloadPolicy) -> None:
        self.model = model
        self.config = model.config
        self.transport = transport
        self.device: Device = transport.device
        self.policy = policy
        self.stats = OffloadStats()
        self._num_resident = policy.resident_layers(self.config.num_layers)
        self._offloaded = list(range(self._num_resident, self.config.num_layers))
        self._host: dict[int, HostBuffer] = {}
        self._resident: dict[int, LayerWeights] = {}
        self._allocations: list[DeviceBuffer] = []  # resident weights, freed at close
        self._cache_buffers: list[DeviceBuffer] = []  # the current generation's KV cache
        self._inflight: deque[_InFlight] = deque()
        self._issued = 0  # loads issued so far; the next is self._offloaded[_issued % len] (cyclic)
        self._hinted = 0  # loads hinted so far

    @staticmethod
    def device_bytes_needed(
        config: ModelConfig, policy: OffloadPolicy, batch_size: int, max_tokens: int
    ) -> int:
        """Device arena bytes an offloaded generation of `batch_size` rows of `max_tokens` needs at peak.

        Resident weights (embedding, norms, untied head, resident layers), the layers in flight
        (`prefetch_layers + 1` in host dtype, plus one fp32 upcast buffer when the host dtype is not
        fp32) and the KV cache. Activations are not allocated in the arena.
        """
        layer_numel = LayerWeights.numel(config)
        resident = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
        resident += config.hidden_size + policy.resident_layers(config.num_layers) * layer_numel
        streamed = config.num_layers - policy.resident_layers(config.num_layers)
        in_flight = 0
        if streamed:
            host_bytes = torch.empty((), dtype=policy.host_dtype.torch).element_size()
            in_flight = min(policy.prefetch_layers + 1, streamed) * layer_numel * host_bytes
            in_flight += 0 if policy.host_dtype is HostDtype.FP32 else layer_numel * 4
        kv = 2 * math.prod(KVCache.shape(config, batch_size, max_tokens))
        return 4 * (resident + kv) + in_flight

    # lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> OffloadedModel:
        try:
            self._stage_host_weights()
            self._load_resident()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Wait for loads in flight, then free every device allocation (idempotent)."""
        while self._inflight:
            entry = self._inflight.popleft()
            try:
                entry.event.wait()
            finally:
                entry.staging.free()
        for buffer in [*self._allocations, *self._cache_buffers]:
            buffer.free()
        self._allocations.clear()
        self._cache_buffers.clear()

    # Runner ----------------------------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(token_ids, self._embedding)

    def context(
        self, batch_size: int, seq_len: int, cache: KVCache | None, pad: torch.Tensor | None = None
    ) -> StepContext:
        return self.model.context(batch_size, seq_len, cache, pad)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head(hidden, self._norm, self._head, self.config.rms_norm_eps)

    def new_cache(self, batch_size: int, max_tokens: int) -> KVCache:
        """A KV cache in device memory. One generation runs at a time: this frees the previous one."""
        for buffer in self._cache_buffers:
            buffer.free()
        shape = KVCache.shape(self.config, batch_size, max_tokens)
        self._cache_buffers = [self.device.empty(shape, torch.float32) for _ in range(2)]
        keys, values = (b.tensor for b in self._cache_buffers)
        return KVCache(self.config, batch_size, max_tokens, storage=(keys, values))

    def run_layers(self, hidden: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        for layer in range(self.config.num_layers):
            if layer in self._resident:
                hidden = self._compute(hidden, self._resident[layer], ctx, layer)
                continue
            self._issue_ahead()
            weights, buffers = self._arrived(layer)
            try:
                hidden = self._compute(hidden, weights, ctx, layer)
            finally:
                for buffer in buffers:
                    buffer.free()
        return hidden

    # internals -------------------------------------------------------------------------------

    def _stage_host_weights(self) -> None:
        dtype = self.policy.host_dtype.torch
        numel = LayerWeights.numel(self.config)
        for layer in self._offloaded:
            flat = torch.empty(numel, dtype=dtype)
            self.model.layers[layer].weights().copy_to_flat(flat)
            self._host[layer] = HostBuffer(flat)

    def _load_resident(self) -> None:
        m = self.model
        self._embedding = self._upload(m.embed_tokens.weight)
        self._norm = self._upload(m.norm_weight)
        self._head = self._embedding if m.lm_head_weight is None else self._upload(m.lm_head_weight)
        numel = LayerWeights.numel(self.config)
        for layer in range(self._num_resident):
            flat = torch.empty(numel)
            m.layers[layer].weights().copy_to_flat(flat)
            self._resident[layer] = LayerWeights.view_flat(self._upload(flat), self.config)

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy a host tensor into a new resident device allocation through the transport."""
        buffer = self._alloc(tuple(tensor.shape), tensor.dtype)
        self.transport.h2d(HostBuffer(tensor.detach().contiguous()), buffer).wait()
        return buffer.tensor

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> DeviceBuffer:
        buffer = self.device.empty(shape, dtype)
        self._allocations.append(buffer)
        return buffer

    def _issue_ahead(self) -> None:
        """Keep `prefetch_layers` + 1 offloaded layers in flight, in cyclic layer order."""
        while len(self._inflight) < min(self.policy.prefetch_layers + 1, len(self._offloaded)):
            layer = self._offloaded[self._issued % len(self._offloaded)]
            self._issued += 1
            source = self._host[layer]
            staging = self.device.empty((source.tensor.numel(),), source.tensor.dtype)
            start = time.perf_counter()
            try:
                event = self.transport.h2d(source, staging)
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
            self.transport.hint(self._host[layer])
            self._hinted += 1

    def _arrived(self, layer: int) -> tuple[LayerWeights, list[DeviceBuffer]]:
        """Wait for `layer`'s weights; returns fp32 views and the device buffers to free after use."""
        entry = self._inflight.popleft()
        assert entry.layer == layer, f"pipeline out of order: expected layer {layer}, got {entry.layer}"
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
            return LayerWeights.view_flat(entry.staging.tensor, self.config), [entry.staging]
        try:
            work = self.device.empty(tuple(entry.staging.shape), torch.float32)
        except BaseException:
            entry.staging.free()
            raise
        work.tensor.copy_(entry.staging.tensor)  # upcast on the device
        entry.staging.free()
        return LayerWeights.view_flat(work.tensor, self.config), [work]

    def _compute(
        self, hidden: torch.Tensor, weights: LayerWeights, ctx: StepContext, layer: int
    ) -> torch.Tensor:
        start = time.perf_counter()
        out = decoder_layer(hidden, weights, ctx, layer, self.config)
        self.stats.compute_s += time.perf_counter() - start
        return out
