"""The model runner: the only piece of the engine that touches the model and moves KV bytes.

It owns the paged KV cache, one device buffer laid out block-major (see `veil.model.paged`), and the
host swap space, one `HostBuffer` per host block (each its own source for PipeLLM's predictors). A step
is: its phase told to the transport (prefill or decode, `step_phase`), swap-outs (one `transport.d2h`
per block), swap-ins (one `transport.h2d` per block), a fence so the copy engine is done with those
blocks, then the step's batches (prefills grouped by length, and the decodes) through the decoder stack
together, layer by layer, each layer's weights taken from the `WeightSource` once (resident, or streamed
in through the transport), and the head only for the rows that sample.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import torch
import torch.nn.functional as F

from veil.cc.host import HostBuffer
from veil.cc.stream import Event
from veil.engine.block_manager import BlockMove
from veil.engine.scheduler import ScheduledChunk, SchedulerOutput
from veil.engine.weights import WeightSource
from veil.lora.bank import DeviceAdapterBank
from veil.lora.layout import SlotLayout, target_shape
from veil.lora.projection import LoraBatch, lora_projection
from veil.model.config import ModelConfig
from veil.model.llama import LayerWeights, StepContext, decoder_layer, lm_head
from veil.model.paged import PagedBatch, PagedKVCache, paged_context, paged_storage_shape
from veil.model.rope import Rotary
from veil.transport import Phase
from veil.transport.base import Transport

KV_DTYPE = torch.float32
PREFILL_MAX_PADDING = 0.1  # a prefill batch computes at most 10% more token positions than it needs


def step_phase(out: SchedulerOutput) -> Phase:
    """The phase a step's transfers belong to: `PREFILL` if any of its chunks is a prefill chunk
    (more than one token: its compute per byte of weights is several times a decode's), else `DECODE`."""
    return Phase.PREFILL if any(_is_prefill(c) for c in out.chunks) else Phase.DECODE


def _is_prefill(chunk: ScheduledChunk) -> bool:
    return len(chunk.token_ids) > 1


def kv_block_bytes(config: ModelConfig, block_size: int) -> int:
    """Bytes of one KV block: keys and values of `block_size` tokens in every layer."""
    return math.prod(paged_storage_shape(config, 1, block_size)) * KV_DTYPE.itemsize


def padding_bounded_groups(
    chunks: list[ScheduledChunk], max_padding: float = PREFILL_MAX_PADDING
) -> list[list[ScheduledChunk]]:
    """Split prefill chunks into batches, by length, each padded by at most `max_padding` of its tokens.

    A batch computes every row at its longest row's length: one long prompt beside short ones would
    multiply the work. Batching prefills buys little on a CPU, so padding is the cost to bound.
    """
    groups: list[list[ScheduledChunk]] = []
    for chunk in sorted(chunks, key=lambda c: len(c.token_ids), reverse=True):
        group = groups[-1] if groups else None
        if group and len(group[0].token_ids) * (len(group) + 1) <= (1 + max_padding) * (
            sum(len(c.token_ids) for c in group) + len(chunk.token_ids)
        ):
            group.append(chunk)
        else:
            groups.append([chunk])
    return groups


def layer_cost(
    config: ModelConfig, chunks: Sequence[ScheduledChunk], lora: SlotLayout | None = None
) -> tuple[float, float]:
    """(FLOPs, bytes read) of one decoder layer over `chunks` (one pass; for traces, `veil.trace`).

    FLOPs: 2 per weight per token, plus attention's 4 x query width per (token, context position)
    pair, plus, for each token of a row with an adapter, 2 x rank x (in + out features) per adapted
    target of the bank's `lora` layout (its A and B matmuls); bytes: the layer's fp32 weights once,
    plus each row's K and V over its context.
    """
    tokens = sum(len(c.token_ids) for c in chunks)
    pairs = sum(len(c.token_ids) * (c.start + len(c.token_ids)) for c in chunks)
    context = sum(c.start + len(c.token_ids) for c in chunks)
    weights = LayerWeights.numel(config)
    flops = 2.0 * weights * tokens + 4.0 * config.q_size * pairs
    if lora is not None:
        adapted = sum(len(c.token_ids) for c in chunks if c.adapter_slot is not None)
        flops += 2.0 * lora.rank * adapted * sum(_lora_features(config, t) for t in lora.targets)
    nbytes = 4.0 * weights + 2 * context * config.kv_size * KV_DTYPE.itemsize
    return flops, nbytes


def _lora_features(config: ModelConfig, target: str) -> int:
    """In plus out features of one LoRA target: what its A and B multiply per token and rank."""
    in_features, start, end = target_shape(config, target)
    return in_features + end - start


@dataclass
class RunnerStats:
    layer_compute_s: float = 0.0  # time in decoder layers (not waiting for weights, not the head)
    last_swap_s: float = 0.0  # the last step's swaps, until its blocks were in place
    last_forward_s: float = 0.0  # the last step's forward pass (weights, layers, head)
    last_layers_s: float = 0.0  # the last step's time in decoder layers
    last_fetch_s: float = 0.0  # the last step's time getting layer weights (streamed: loads, waits)


@dataclass
class _Pass:
    """One batch of a step on its way through the decoder stack."""

    chunks: list[ScheduledChunk]
    lengths: list[int]
    hidden: torch.Tensor  # (B, T, hidden)
    ctx: StepContext
    lora: LoraBatch | None  # the rows' adapters, when any row has one


class ModelRunner:
    """Runs scheduled steps over a paged KV cache in the device arena.

    Args:
        config: the model's shape.
        weights: device weights, one layer at a time.
        transport: moves swapped blocks; its device holds the KV cache.
        num_device_blocks, num_host_blocks, block_size: the block manager's geometry.
        adapters: the LoRA adapter bank, if the engine serves adapters (the plan's `adapter_loads` are
            issued after the swaps, and each batch waits for the slots its rows use).

    Raises:
        DeviceOutOfMemory: if the arena cannot hold `num_device_blocks` blocks.
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: WeightSource,
        transport: Transport,
        *,
        num_device_blocks: int,
        num_host_blocks: int,
        block_size: int,
        adapters: DeviceAdapterBank | None = None,
    ) -> None:
        self.config = config
        self.adapters = adapters  # LoRA adapter slots in the arena, loaded through the transport
        self.weights = weights
        self.transport = transport
        self.block_size = block_size
        self.block_bytes = kv_block_bytes(config, block_size)
        self.kv = transport.device.empty(paged_storage_shape(config, num_device_blocks, block_size), KV_DTYPE)
        self.kv.tensor.zero_()  # masked keys are still multiplied by zero: they must not be NaN
        block_shape = paged_storage_shape(config, 1, block_size)[1:]  # (layers, 2, bs, KV, hd)
        self.host = [HostBuffer.empty(block_shape, KV_DTYPE) for _ in range(num_host_blocks)]
        self._swapping_out: dict[int, Event] = {}  # host block -> its d2h
        self.rotary = Rotary(config)
        self.stats = RunnerStats()

    # swapping --------------------------------------------------------------------------------------
    def swap(self, swap_out: Sequence[BlockMove], swap_in: Sequence[BlockMove]) -> None:
        """Carry out the plans; on return the device blocks involved are free to compute on."""
        for move in swap_out:
            self._swapping_out[move.dst] = self.transport.d2h(
                self.kv, self.host[move.dst], src_offset=move.src * self.block_bytes, nbytes=self.block_bytes
            )
        arrivals = []
        for move in swap_in:
            departed = self._swapping_out.pop(move.src, None)
            if departed is not None:
                departed.wait()  # the block must be in host memory before it goes back
            arrivals.append(
                self.transport.h2d(
                    self.host[move.src],
                    self.kv,
                    dst_offset=move.dst * self.block_bytes,
                    nbytes=self.block_bytes,
                )
            )
        if swap_out:  # the copy engine runs in order: once it idles, every swapped-out block was read
            self.transport.device.copy_engine.submit(lambda: None).wait()
        for event in arrivals:
            event.wait()

    def hint_swap_in(self, host_blocks: Sequence[int]) -> None:
        """Tell the transport these host blocks are the next to come back."""
        for block in host_blocks:
            self.transport.hint(self.host[block], nbytes=self.block_bytes)

    # compute ---------------------------------------------------------------------------------------
    def execute(
        self, out: SchedulerOutput, embeds: Mapping[int, torch.Tensor] | None = None
    ) -> dict[int, torch.Tensor]:
        """Run one scheduled step; returns last-position logits (vocab,) of every sampling sequence.

        The transport is told the step's phase first (`step_phase`). The step's batches (prefills
        grouped by length, then the decodes) go through the decoder stack layer by layer together, so
        each layer's weights are fetched once per step (a streamed layer crosses the transport once).
        `embeds` maps a sequence to its prompt's embeddings (T, hidden) when the prompt came as
        embeddings; those positions skip the embedding table.
        """
        started = time.perf_counter()
        self.stats.last_layers_s = self.stats.last_fetch_s = 0.0
        self.transport.enter_phase(step_phase(out))  # before the step's first transfer
        self.swap(out.swap_out, out.swap_in)
        swapped = time.perf_counter()
        self.stats.last_swap_s = swapped - started
        if self.adapters is not None:
            for name, slot in out.adapter_loads:  # asynchronous: a batch waits for the slots it uses
                self.adapters.load(name, slot)
        logits = self._forward(out, embeds or {})
        self.stats.last_forward_s = time.perf_counter() - swapped
        return logits

    def _forward(self, out: SchedulerOutput, embeds: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        prefills = [c for c in out.chunks if _is_prefill(c)]
        decodes = [c for c in out.chunks if not _is_prefill(c)]
        groups = [group for group in [*padding_bounded_groups(prefills), decodes] if group]
        logits: dict[int, torch.Tensor] = {}
        if not groups:
            return logits
        recorder = self.transport.recorder
        with torch.inference_mode():
            passes = [self._begin(group, embeds) for group in groups]
            costs = [self._pass_cost(p) for p in passes] if recorder is not None else []
            for layer in range(self.config.num_layers):
                needs = recorder.data_transfers if recorder is not None else 0  # before this layer's loads
                fetching = time.perf_counter()
                weights = self.weights.layer(layer)
                started = mark = time.perf_counter()
                seconds: list[float] = []  # each pass's
                try:
                    for p in passes:
                        project = None if p.lora is None else lora_projection(weights, layer, p.lora)
                        p.hidden = decoder_layer(p.hidden, weights, p.ctx, layer, self.config, project)
                        seconds.append(time.perf_counter() - mark)
                        mark += seconds[-1]
                finally:
                    self.weights.release(layer)
                elapsed = time.perf_counter() - started
                self.stats.layer_compute_s += elapsed
                self.stats.last_layers_s += elapsed
                self.stats.last_fetch_s += started - fetching
                if recorder is not None:
                    for (flops, nbytes, tokens, adapters), s in zip(costs, seconds, strict=True):
                        recorder.compute(flops, nbytes, s, needs, tokens=tokens, adapters=adapters)
            for p in passes:
                logits.update(self._head(p))
        return logits

    def _begin(self, chunks: list[ScheduledChunk], embeds: Mapping[int, torch.Tensor]) -> _Pass:
        """One batch's input hidden states and per-step context, before the first layer."""
        lengths = [len(c.token_ids) for c in chunks]
        batch = PagedBatch.build(
            [c.start for c in chunks], lengths, [c.block_table for c in chunks], self.block_size
        )
        ids = torch.zeros(batch.positions.shape, dtype=torch.long)  # (B, T), padding with token 0
        for row, chunk in enumerate(chunks):
            ids[row, : lengths[row]] = torch.tensor(chunk.token_ids)
        hidden = F.embedding(ids, self.weights.embedding)  # (B, T, hidden)
        for row, chunk in enumerate(chunks):
            given = embeds.get(chunk.seq_id)
            if given is not None and chunk.start < given.shape[0]:
                n = min(lengths[row], given.shape[0] - chunk.start)
                hidden[row, :n] = given[chunk.start : chunk.start + n]
        ctx = paged_context(self.rotary, batch, PagedKVCache(self.kv.tensor, batch))
        slots = [c.adapter_slot for c in chunks]
        lora = None
        if any(slot is not None for slot in slots):
            assert self.adapters is not None, "a chunk names an adapter slot but the runner has no bank"
            lora = self.adapters.batch(slots)  # waits for the loads into those slots
        return _Pass(chunks, lengths, hidden, ctx, lora)

    def _pass_cost(self, p: _Pass) -> tuple[float, float, int, int]:
        """(FLOPs, bytes, tokens, distinct adapters) of one layer of pass `p`, for its trace span."""
        layout = None if p.lora is None else p.lora.layout
        adapters = 0 if p.lora is None else len(p.lora.groups)
        return (*layer_cost(self.config, p.chunks, layout), sum(p.lengths), adapters)

    def _head(self, p: _Pass) -> dict[int, torch.Tensor]:
        rows = [row for row, chunk in enumerate(p.chunks) if chunk.sample]
        if not rows:
            return {}
        last = p.hidden[rows, [p.lengths[row] - 1 for row in rows]]  # (R, hidden)
        logits = lm_head(last, self.weights.norm, self.weights.head, self.config.rms_norm_eps)  # (R, vocab)
        return {p.chunks[row].seq_id: logits[i] for i, row in enumerate(rows)}

    # lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for swap-outs in flight and free the KV cache (idempotent)."""
        for event in self._swapping_out.values():
            event.wait()
        self._swapping_out.clear()
        self.kv.free()

    def __enter__(self) -> ModelRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
