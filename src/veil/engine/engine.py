"""The serving engine: requests in, one token per running request per step out.

`LLMEngine` owns an emulated `Device`, the transport to it, the weights resident in its arena, the
scheduler and the model runner. A step is: schedule, run (swaps, then the forward pass), sample,
post-process. Every KV swap crosses the device boundary through the transport, so `plain`, `cc` and
`pipellm` all apply.
"""

from __future__ import annotations

import itertools
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType

import torch

from veil.cc.device import Device
from veil.engine.block_manager import BlockManager
from veil.engine.costs import MeasuredCosts
from veil.engine.offload_policy import OffloadPolicy
from veil.engine.request import FinishReason, Sequence
from veil.engine.runner import ModelRunner, kv_block_bytes
from veil.engine.scheduler import PreemptionMode, Scheduler, SchedulerConfig, SchedulerOutput
from veil.engine.weights import ResidentWeights, StreamedWeights, WeightSource
from veil.lora.adapter import Adapter
from veil.lora.bank import DeviceAdapterBank
from veil.lora.layout import TARGETS
from veil.lora.slots import SlotTable
from veil.model.llama import Llama
from veil.model.sampling import Sampler, SamplingParams
from veil.pipellm.options import PipeLLMOptions
from veil.trace import TraceRecorder
from veil.transport import make_transport
from veil.transport.base import TransportKind

DEFAULT_DEVICE_BLOCKS = 256


@dataclass(frozen=True)
class LoraConfig:
    """Device slots for LoRA adapters (see veil.lora): how many, of what largest rank, over which
    target projections, and whether the engine names the adapters its waiting requests need to the
    transport (PipeLLM then seals them ahead)."""

    num_slots: int = 4
    max_rank: int = 16
    targets: tuple[str, ...] = TARGETS
    hint_transport: bool = True


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. The arena holds the weights plus `num_device_blocks` KV blocks; give the
    block count, or the arena size (the blocks are then what it leaves), or both."""

    transport: TransportKind = TransportKind.PLAIN  # how KV swaps and the weight upload cross
    block_size: int = 16  # tokens per KV block
    num_device_blocks: int | None = None  # KV blocks on the device; None: see the class docstring
    num_host_blocks: int = 64  # KV blocks of host swap space
    device_memory_bytes: int | None = None  # arena capacity; None: just weights + KV blocks
    max_num_batched_tokens: int = 2048  # tokens computed per step, prefill and decode together
    max_num_seqs: int = 64  # requests running at once
    preemption_mode: PreemptionMode = PreemptionMode.SWAP
    offload: OffloadPolicy | None = None  # stream decoder layers from host memory; None: all resident
    pipellm: PipeLLMOptions | None = None  # settings of the pipellm transport (None: its defaults)
    lora: LoraConfig | None = None  # adapter slots; None: the engine serves the base model only

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.preemption_mode)

    def weights_bytes(self, model: Llama) -> int:
        """Arena bytes the weights take at peak (resident, or resident part plus loads in flight), and
        the adapter slots."""
        weights = (
            ResidentWeights.device_bytes(model)
            if self.offload is None
            else StreamedWeights.device_bytes(model.config, self.offload)
        )
        if self.lora is not None:
            lora = self.lora
            weights += DeviceAdapterBank.device_bytes(
                model.config, num_slots=lora.num_slots, rank=lora.max_rank, targets=lora.targets
            )
        return weights

    def geometry(self, model: Llama) -> tuple[int, int]:
        """(arena bytes, device KV blocks) for `model`.

        Raises:
            ValueError: if the arena cannot hold the weights and at least one block (or the blocks asked).
        """
        weights = self.weights_bytes(model)
        block = kv_block_bytes(model.config, self.block_size)
        if self.device_memory_bytes is None:
            blocks = DEFAULT_DEVICE_BLOCKS if self.num_device_blocks is None else self.num_device_blocks
            return weights + blocks * block, blocks
        fit = (self.device_memory_bytes - weights) // block
        blocks = fit if self.num_device_blocks is None else self.num_device_blocks
        if blocks < 1 or blocks > fit:
            raise ValueError(
                f"device memory of {self.device_memory_bytes} bytes holds {max(fit, 0)} KV blocks of "
                f"{block} bytes after {weights} bytes of weights; need {max(blocks, 1)}"
            )
        return self.device_memory_bytes, blocks


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: int
    new_token_ids: list[int]  # tokens generated in this step
    finished: bool
    finish_reason: FinishReason | None  # set when finished


@dataclass
class EngineStats:
    """Counters since the engine started."""

    steps: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    preempted_by_recompute: int = 0  # the other preemptions swapped
    adapter_loads: int = 0  # LoRA adapters copied into a device slot
    blocks_swapped_out: int = 0
    blocks_swapped_in: int = 0
    bytes_swapped_out: int = 0
    bytes_swapped_in: int = 0
    finished_by: dict[str, int] = field(default_factory=dict)


class LLMEngine:
    """Continuous batching over a paged KV cache on an emulated confidential device.

    Use as a context manager: entering starts the device and the transport and uploads the weights;
    leaving waits for transfers in flight and stops them.

    Args:
        model: the model whose weights to serve (copied to the device on entry).
        config: engine settings.
        eos_token_ids: stop tokens of requests whose `stop_token_ids` is None (default: the model's).
        recorder: records every transfer from start-up on, and every step (`veil.trace`); None: none.
    """

    def __init__(
        self,
        model: Llama,
        config: EngineConfig | None = None,
        *,
        eos_token_ids: tuple[int, ...] | None = None,
        recorder: TraceRecorder | None = None,
    ) -> None:
        self.model = model
        self._recorder = recorder
        self.config = config or EngineConfig()
        self.capacity_bytes, num_device_blocks = self.config.geometry(model)
        self.eos_token_ids = frozenset(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.block_manager = BlockManager(
            num_device_blocks=num_device_blocks,
            num_host_blocks=self.config.num_host_blocks,
            block_size=self.config.block_size,
        )
        self.costs = MeasuredCosts()
        lora = self.config.lora
        self.slots = None if lora is None else SlotTable(lora.num_slots)
        self.scheduler = Scheduler(self.config.scheduler_config(), self.block_manager, self.costs, self.slots)
        self._adapters_hinted: set[str] = set()
        self.stats = EngineStats()
        self._runner: ModelRunner | None = None
        self._stack = ExitStack()
        self._samplers: dict[int, Sampler] = {}
        self._embeds: dict[int, torch.Tensor] = {}  # prompts given as embeddings, (T, hidden)
        self._hinted: set[int] = set()
        self._ids = itertools.count()

    # lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> LLMEngine:
        if self._runner is not None:
            raise RuntimeError("the engine is already started")
        with ExitStack() as stack:
            device = stack.enter_context(Device(capacity_bytes=self.capacity_bytes, name="veil-engine"))
            pipellm = self.config.pipellm if self.config.transport is TransportKind.PIPELLM else None
            transport = stack.enter_context(make_transport(self.config.transport, device, pipellm=pipellm))
            transport.recorder = self._recorder
            weights: WeightSource = stack.enter_context(
                ResidentWeights(self.model, transport)
                if self.config.offload is None
                else StreamedWeights(self.model, transport, self.config.offload)
            )
            lora = self.config.lora
            bank = None
            if lora is not None:
                bank = stack.enter_context(
                    DeviceAdapterBank(
                        transport,
                        self.model.config,
                        num_slots=lora.num_slots,
                        rank=lora.max_rank,
                        targets=lora.targets,
                    )
                )
            self._runner = stack.enter_context(
                ModelRunner(
                    self.model.config,
                    weights,
                    transport,
                    num_device_blocks=self.block_manager.device.num_blocks,
                    num_host_blocks=self.block_manager.host.num_blocks,
                    block_size=self.block_manager.block_size,
                    adapters=bank,
                )
            )
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the runner, free the weights, stop the transport and the device (idempotent)."""
        self._runner = None
        self._stack.close()

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise RuntimeError("the engine is not started; use it as a context manager")
        return self._runner

    # adapters --------------------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: Adapter) -> None:
        """Register a LoRA adapter (kept in host memory; loaded into a slot when a request needs it).

        Raises:
            RuntimeError: if the engine is not started. ValueError: if the engine has no adapter slots
            or `name` is taken. AdapterError: if the adapter does not fit the model or the slots.
        """
        bank = self.runner.adapters
        if bank is None:
            raise ValueError("the engine has no adapter slots: give EngineConfig(lora=LoraConfig(...))")
        bank.add(name, adapter)

    @property
    def adapters(self) -> tuple[str, ...]:
        """Names of the registered adapters."""
        bank = self._runner.adapters if self._runner is not None else None
        return () if bank is None else bank.names

    # requests --------------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> int:
        """Queue a request given as token ids, or as embeddings (split inference: the client computed
        the embedding layer, the engine runs every later one); returns its id.

        Raises:
            ValueError: if neither or both prompts are given, the prompt is empty, a token id lies
                outside [0, vocab_size), the embeddings are not a finite float32 (T, hidden) tensor,
                the prompt with its max_tokens can never fit in the device's KV blocks, or `adapter`
                is not a registered adapter.
        """
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"unknown adapter {adapter!r}; registered: {list(self.adapters)}")
        if (prompt_token_ids is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt_token_ids and prompt_embeds")
        if prompt_embeds is not None:
            prompt_token_ids = [0] * self._check_embeds(prompt_embeds)  # placeholders: positions only
        assert prompt_token_ids is not None
        vocab_size = self.model.config.vocab_size
        if any(not 0 <= token < vocab_size for token in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        params = params or SamplingParams()
        stops = self.eos_token_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        seq = Sequence(next(self._ids), list(prompt_token_ids), params, stop_token_ids=stops, adapter=adapter)
        self.scheduler.add(seq)
        self._samplers[seq.seq_id] = Sampler(params)
        if prompt_embeds is not None:
            self._embeds[seq.seq_id] = prompt_embeds.detach().contiguous()
        return seq.seq_id

    def abort(self, request_id: int) -> bool:
        """Stop a request and free its KV blocks; False if it was not in flight."""
        self._forget(request_id)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, and report each request that got a token.

        Raises:
            RuntimeError: if the engine is not started.
            IntegrityError: if a swapped block fails to authenticate (cc, pipellm); the step's plan
                is then half done, so close the engine.
        """
        runner = self.runner  # raises before anything is scheduled if the engine is not started
        recorder, started = runner.transport.recorder, time.perf_counter()
        if recorder is not None:
            recorder.begin_step()
        plan = self.scheduler.schedule()
        logits = runner.execute(plan, self._embeds)
        self._measure(plan)
        sampled = {seq_id: int(self._samplers[seq_id](row[None])[0]) for seq_id, row in logits.items()}
        outputs = [self._output(seq) for seq in self.scheduler.postprocess(plan, sampled)]
        self._count(plan, outputs)
        self._hint_next_swap_in()
        self._hint_adapters(plan)
        if recorder is not None:
            self._record_host_span(recorder, time.perf_counter() - started, len(outputs))
        return outputs

    def record(self, recorder: TraceRecorder | None) -> None:
        """Record every later step's transfers and compute spans into `recorder` (None: stop).

        Raises:
            RuntimeError: if the engine is not started.
        """
        self.runner.transport.recorder = recorder

    # helpers ---------------------------------------------------------------------------------------
    def _record_host_span(self, recorder: TraceRecorder, step_s: float, tokens: int) -> None:
        """Close the step in the trace: its work outside layers, swaps and weight loads (scheduling,
        embedding, head, sampling) as one host span, then the step's tokens and wall time."""
        timing = self.runner.stats
        host_s = max(0.0, step_s - timing.last_layers_s - timing.last_fetch_s - timing.last_swap_s)
        recorder.compute(0.0, 0.0, host_s, 0, "host")
        recorder.end_step(tokens, step_s)

    def _check_embeds(self, embeds: torch.Tensor) -> int:
        hidden = self.model.config.hidden_size
        if embeds.dtype != torch.float32 or embeds.dim() != 2 or embeds.shape[1] != hidden:
            raise ValueError(
                f"prompt embeddings must be float32 of shape (T, {hidden}), "
                f"got {embeds.dtype} {tuple(embeds.shape)}"
            )
        if not bool(torch.isfinite(embeds).all()):
            raise ValueError("prompt embeddings must be finite")
        return int(embeds.shape[0])

    def _forget(self, request_id: int) -> None:
        self._samplers.pop(request_id, None)
        self._embeds.pop(request_id, None)

    def _output(self, seq: Sequence) -> RequestOutput:
        if seq.finished:
            self._forget(seq.seq_id)
        return RequestOutput(seq.seq_id, seq.output_token_ids[-1:], seq.finished, seq.finish_reason)

    def _hint_next_swap_in(self) -> None:
        """Name the host blocks of the request that will swap in first (PipeLLM seals them ahead)."""
        swapped = self.scheduler.swapped
        if swapped and swapped[0].seq_id not in self._hinted:
            self._hinted.add(swapped[0].seq_id)
            self.runner.hint_swap_in(self.block_manager.host_table(swapped[0].seq_id))
        self._hinted.intersection_update(seq.seq_id for seq in swapped)

    def _hint_adapters(self, plan: SchedulerOutput) -> None:
        """Name to the transport, once each, the adapters the queued requests need that are not in a
        slot, in queue order (PipeLLM seals them ahead: the queue is its predictor for adapters)."""
        lora, bank, slots = self.config.lora, self.runner.adapters, self.slots
        if lora is None or bank is None or slots is None or not lora.hint_transport:
            return
        self._adapters_hinted.difference_update(name for name, _ in plan.adapter_loads)
        queued = [seq.adapter for seq in [*self.scheduler.swapped, *self.scheduler.waiting] if seq.adapter]
        hinted = self._adapters_hinted
        upcoming = [n for n in dict.fromkeys(queued) if slots.slot_of(n) is None and n not in hinted]
        bank.hint(upcoming)
        self._adapters_hinted.update(upcoming)

    def _measure(self, plan: SchedulerOutput) -> None:
        """Feed the step's swap and forward times to the preemption cost model."""
        timing = self.runner.stats
        self.costs.record_swap(len(plan.swap_out) + len(plan.swap_in), timing.last_swap_s)
        prefill = sum(len(c.token_ids) for c in plan.chunks if len(c.token_ids) > 1)
        self.costs.record_forward(prefill, plan.num_batched_tokens, timing.last_forward_s)

    def _count(self, plan: SchedulerOutput, outputs: list[RequestOutput]) -> None:
        s, block_bytes = self.stats, self.runner.block_bytes
        s.steps += 1
        s.generated_tokens += len(outputs)
        s.preemptions += len(plan.preempted)
        s.preempted_by_recompute += len(plan.recomputed)
        s.adapter_loads += len(plan.adapter_loads)
        s.blocks_swapped_out += len(plan.swap_out)
        s.blocks_swapped_in += len(plan.swap_in)
        s.bytes_swapped_out += len(plan.swap_out) * block_bytes
        s.bytes_swapped_in += len(plan.swap_in) * block_bytes
        for out in outputs:
            if out.finish_reason is not None:
                s.finished_by[out.finish_reason.value] = s.finished_by.get(out.finish_reason.value, 0) + 1
