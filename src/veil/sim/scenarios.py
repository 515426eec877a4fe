"""The paper's three workloads as traces at model scale: FlexGen offloading, vLLM KV swapping under a
ShareGPT-like request set, S-LoRA-like adapter swapping.

Each generator writes the `veil.trace` format the engine records, so the one `replay` runs them all
(and a recorded trace alike). The policies are the engine's (docs/engine.md), sized by the profiles:
- `offload_trace`: FlexGen's published placement (KV cache and hidden states on the CPU, attention on
  the CPU, the batch in GPU batches of 48) with the weights on the CPU, streamed each step, layer j+1
  loading while layer j computes (the schedule is `simulator.flexgen_trace`'s).
- `kvswap_trace`: continuous batching over 16-token KV blocks in the memory the weights leave; when a
  running request needs a block and none is free the newest is preempted by swapping every block out
  (one d2h per block, block-major as in veil's engine); swapped requests come back oldest first before
  new ones are admitted; the engine hints the blocks of the next request to swap in.
- `adapter_trace`: requests name adapters by a Zipf law; the device holds `slots` adapters (LRU); a
  request is admitted once its adapter is loaded (one h2d per adapter); the engine hints the adapters
  the queue needs next.
Lengths are ShareGPT-like: log-normal with the vLLM paper's means (161 prompt, 338 output tokens),
sigma 1.0 (assumed), seeded.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from veil.sim.hardware import HardwareProfile, ModelProfile
from veil.sim.simulator import FlexGenPolicy, Scenario, flexgen_trace, layout
from veil.trace import Op, Trace, TraceRecorder

BLOCK_TOKENS = 16  # vLLM's and veil's KV block size
SHAREGPT_MEAN_PROMPT = 161  # vLLM paper (Kwon et al., SOSP 2023), ShareGPT means
SHAREGPT_MEAN_OUTPUT = 338
LENGTH_SIGMA = 1.0  # assumed spread of the log-normal lengths
# FlexGen's published single-GPU OPT-30B policy at 512 + 32 tokens (FlexLLMGen
# benchmark/flexllmgen/bench_suite.py, suite_30b_1x1; also its README's HELM example):
# --percent 20 80 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 3 --cpu
FLEXGEN_GPU_BATCH = 48


@dataclass(frozen=True)
class Workload:
    """What to generate.

    Attributes:
        batch: offloading: sequences decoded together (FlexGen's effective batch); serving: most
            requests running at once.
        steps: decode steps to generate (serving: the run is cut there).
        prompt_tokens, output_tokens: offloading: context of every sequence (FlexGen's benchmark
            default: 512 prompt, 32 output).
        requests: serving: requests in the set, all arriving at once.
        adapters, slots, rank: adapter swapping: adapters in host memory, device slots, LoRA rank on
            q, k, v, o (S-LoRA's setting; assumed rank 16).
        zipf: exponent of adapter popularity (S-LoRA: power law, assumed 1.0).
        seed: lengths and adapter draws.
        gpu_batch_size: offloading: FlexGen's GPU batch; `batch` runs as `batch / gpu_batch_size` GPU
            batches sharing each weight load.
        weights_gpu_share: offloading: share of the weights FlexGen keeps on the GPU
            (`w_gpu_percent` / 100; assumed 0: PipeLLM's workload is weight offloading, and every
            model it reports streams weights).
    """

    batch: int = 64
    steps: int = 4
    prompt_tokens: int = 512
    output_tokens: int = 32
    requests: int = 512
    adapters: int = 64
    slots: int = 8
    rank: int = 16
    zipf: float = 1.0
    seed: int = 0
    gpu_batch_size: int = FLEXGEN_GPU_BATCH
    weights_gpu_share: float = 0.0


def flops_per_token(model: ModelProfile, context_tokens: float) -> float:
    """FLOPs of one token through every decoder layer: 2 per weight plus attention over `context_tokens`."""
    return model.layers * (2 * model.params_per_layer + 4 * context_tokens * model.hidden)


def flexgen_policy(w: Workload) -> FlexGenPolicy:
    """FlexGen's published placement (OPT-30B and OPT-175B policies): KV cache and hidden states in
    host memory, decode attention on the CPU, `w.batch` in GPU batches of `w.gpu_batch_size`.

    Raises:
        ValueError: if `w.batch` is not a multiple of `w.gpu_batch_size`.
    """
    gpu_batch = min(w.gpu_batch_size, w.batch)
    if w.batch % gpu_batch:
        raise ValueError(f"batch {w.batch} is not a multiple of the GPU batch {gpu_batch}")
    return FlexGenPolicy(
        gpu_batch, w.batch // gpu_batch, cache_on_cpu=True, cpu_attention=True, acts_on_cpu=True
    )


def flexgen_offload_fraction(model: ModelProfile, hw: HardwareProfile, w: Workload) -> float:
    """Share of the weights FlexGen streams: all but `w.weights_gpu_share`, and at least what does not
    fit in the GPU's memory (the KV cache is in host memory)."""
    room = hw.gpu_memory_bytes * hw.gpu_memory_usable
    return min(1.0, max(1 - w.weights_gpu_share, 1 - room / model.weight_bytes, 0.0))


def flexgen_scenario(model: ModelProfile, hw: HardwareProfile, w: Workload, *, prefill: bool) -> Scenario:
    """One FlexGen pass of `w` (decode at the mean context, or the prompt) under FlexGen's policy."""
    context = w.prompt_tokens if prefill else w.prompt_tokens + w.output_tokens // 2
    fraction = max(flexgen_offload_fraction(model, hw, w), 1e-6)  # all resident: streams next to nothing
    return Scenario(model, hw, w.batch, context_tokens=context, offload_fraction=fraction,
                    policy=flexgen_policy(w), prefill=prefill)  # fmt: skip


def offload_trace(model: ModelProfile, hw: HardwareProfile, w: Workload) -> Trace:
    """FlexGen's `w.steps` decode steps over every layer, as a trace (`simulator.flexgen_trace`)."""
    sc = flexgen_scenario(model, hw, w, prefill=False)
    sc = dataclasses.replace(sc, steps=w.steps, warmup_steps=0, max_requests=1 << 62)
    return flexgen_trace(sc, layout(sc))


def sharegpt_lengths(w: Workload) -> list[tuple[int, int]]:
    """(prompt, output) tokens of each request: log-normal with ShareGPT's means, seeded."""
    rng = np.random.default_rng(w.seed)

    def draw(mean: int) -> np.ndarray:
        mu = math.log(mean) - LENGTH_SIGMA**2 / 2  # so that the mean is `mean`
        return np.clip(np.round(rng.lognormal(mu, LENGTH_SIGMA, w.requests)), 4, 2048).astype(int)

    return list(zip(draw(SHAREGPT_MEAN_PROMPT).tolist(), draw(SHAREGPT_MEAN_OUTPUT).tolist(), strict=True))


def device_kv_blocks(model: ModelProfile, hw: HardwareProfile) -> int:
    """KV blocks of `BLOCK_TOKENS` the device holds beside the resident weights."""
    room = hw.gpu_memory_bytes * hw.gpu_memory_usable - model.weight_bytes
    return max(0, int(room // (BLOCK_TOKENS * model.kv_bytes_per_token)))


@dataclass
class _Request:
    prompt: int
    output: int
    generated: int = 0
    blocks: int = 0  # device blocks held
    host: tuple[int, ...] = ()  # host blocks holding it while swapped out
    adapter: int = -1

    @property
    def tokens(self) -> int:
        return self.prompt + self.generated


def _blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


class _ServingCost:
    """Compute spans of serving steps: every running request's decode plus new prompts' prefill."""

    def __init__(self, model: ModelProfile, rec: TraceRecorder, extra_flops_per_token: float = 0.0) -> None:
        self.model, self.rec, self.extra = model, rec, extra_flops_per_token

    def step(self, decoding: list[_Request], prefilled: list[_Request]) -> None:
        m = self.model
        flops = sum(flops_per_token(m, r.tokens) for r in decoding)
        flops += sum(r.prompt * flops_per_token(m, r.prompt / 2) for r in prefilled)
        flops += self.extra * (len(decoding) + sum(r.prompt for r in prefilled))
        kv = sum(r.tokens for r in [*decoding, *prefilled]) * m.kv_bytes_per_token
        self.rec.compute(flops, m.weight_bytes + kv, 0.0, self.rec.data_transfers)


def kvswap_trace(model: ModelProfile, hw: HardwareProfile, w: Workload) -> Trace:
    """vLLM-style continuous batching with swap preemption on a ShareGPT-like request set.

    Raises:
        ValueError: if the weights leave no room for a single request's KV blocks.
    """
    free = device_kv_blocks(model, hw)
    requests = [_Request(p, o) for p, o in sharegpt_lengths(w)]
    if free < max(_blocks_for(r.prompt + r.output) for r in requests):
        raise ValueError(f"{model.name}: the device holds {free} KV blocks, too few for the longest request")
    block_bytes = BLOCK_TOKENS * model.kv_bytes_per_token
    rec = TraceRecorder(workload="kvswap", model=model.name, device_blocks=free, block_bytes=block_bytes)
    engine = _SwapEngine(rec, free, block_bytes, requests)
    cost = _ServingCost(model, rec)
    for _ in range(w.steps):
        if not engine.unfinished:
            break
        rec.begin_step()
        preempted = engine.grow()
        if not preempted:
            engine.swap_in()
        prefilled = engine.admit(w.batch)
        cost.step([r for r in engine.running if r not in prefilled], prefilled)
        generated = engine.generate()
        engine.hint()
        rec.end_step(generated, 0.0)
    return rec.trace


class _SwapEngine:
    """The scheduler's queues and the device's free blocks; swaps go into the trace."""

    def __init__(self, rec: TraceRecorder, free: int, block_bytes: int, requests: list[_Request]) -> None:
        self.rec, self.free, self.block_bytes = rec, free, block_bytes
        self.waiting, self.running, self.swapped = list(requests), list[_Request](), list[_Request]()
        self._host_free: list[int] = []  # host blocks not holding anything
        self._host_count = 0
        self._versions: dict[int, int] = {}  # host block -> write version
        self._hinted: set[int] = set()

    @property
    def unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def grow(self) -> bool:
        """Give each running request (oldest first) the block its next token needs, preempting the
        newest while none is free; returns True if anything was preempted."""
        preempted = False
        for r in list(self.running):
            if r not in self.running or r.tokens + 1 <= r.blocks * BLOCK_TOKENS:
                continue
            while self.free == 0:
                victim = self.running.pop()
                self._swap_out(victim)
                preempted = True
                if victim is r:
                    break
            if r in self.running:
                r.blocks += 1
                self.free -= 1
        return preempted

    def _swap_out(self, r: _Request) -> None:
        host = []
        for _ in range(r.blocks):
            if not self._host_free:
                self._host_free.append(self._host_count)
                self._host_count += 1
            block = self._host_free.pop()
            self.rec.transfer(Op.D2H, block, 0, self.block_bytes, self._versions.get(block, 0))
            self._versions[block] = self._versions.get(block, 0) + 2  # a write bumps on entry and exit
            host.append(block)
        self.free += r.blocks
        r.blocks, r.host = 0, tuple(host)
        self.swapped.append(r)

    def swap_in(self) -> None:
        """Bring swapped requests back, oldest first, while their blocks (and one more) fit."""
        while self.swapped and _blocks_for(self.swapped[0].tokens + 1) <= self.free:
            r = self.swapped.pop(0)
            for block in r.host:
                self.rec.transfer(Op.H2D, block, 0, self.block_bytes, self._versions.get(block, 0))
                self._host_free.append(block)
            r.blocks, r.host = _blocks_for(r.tokens + 1), ()
            self.free -= r.blocks
            self.running.append(r)

    def admit(self, max_running: int) -> list[_Request]:
        """Admit waiting requests (only while nothing is swapped out); returns them (to prefill)."""
        admitted = []
        while (
            not self.swapped
            and self.waiting
            and len(self.running) < max_running
            and _blocks_for(self.waiting[0].prompt + 1) <= self.free
        ):
            r = self.waiting.pop(0)
            r.blocks = _blocks_for(r.prompt + 1)
            self.free -= r.blocks
            self.running.append(r)
            admitted.append(r)
        return admitted

    def generate(self) -> int:
        """Every running request gets a token; finished ones free their blocks. Returns the tokens."""
        for r in self.running:
            r.generated += 1
        tokens = len(self.running)
        for r in [r for r in self.running if r.generated >= r.output]:
            self.running.remove(r)
            self.free += r.blocks
        return tokens

    def hint(self) -> None:
        """Name the blocks of the request that will swap in first, once (as `LLMEngine` does)."""
        for r in self.swapped[:1]:
            if id(r) not in self._hinted:
                self._hinted.add(id(r))
                for block in r.host:
                    self.rec.transfer(Op.HINT, block, 0, self.block_bytes, self._versions.get(block, 0))


def adapter_bytes(model: ModelProfile, rank: int) -> int:
    """One LoRA adapter of `rank` on q, k, v and o of every layer: rank x (in + out) per target."""
    h, kv = model.hidden, model.kv_dim
    return model.layers * rank * ((h + h) * 2 + (h + kv) * 2) * model.bytes_per_param


def adapter_trace(model: ModelProfile, hw: HardwareProfile, w: Workload) -> Trace:
    """S-LoRA-like serving: Zipf adapter popularity, `slots` device slots (LRU), queue hints."""
    rng = np.random.default_rng(w.seed + 1)
    popularity = 1.0 / np.arange(1, w.adapters + 1) ** w.zipf
    picks = rng.choice(w.adapters, size=w.requests, p=popularity / popularity.sum()).tolist()
    requests = [_Request(p, o, adapter=a) for (p, o), a in zip(sharegpt_lengths(w), picks, strict=True)]
    nbytes = adapter_bytes(model, w.rank)
    rec = TraceRecorder(workload="lora", model=model.name, adapter_bytes=nbytes, slots=w.slots)
    cost = _ServingCost(model, rec, extra_flops_per_token=2 * nbytes / model.bytes_per_param)
    source = 1_000_000  # host buffers of adapters: source ids apart from anything else
    slots: OrderedDict[int, None] = OrderedDict()  # resident adapters, least recently used first
    waiting, running = list(requests), []
    hinted: set[int] = set()
    for _ in range(w.steps):
        if not (waiting or running):
            break
        rec.begin_step()
        prefilled = []
        while waiting and len(running) + len(prefilled) < w.batch:
            r = waiting[0]
            if r.adapter not in slots:
                in_use = {x.adapter for x in [*running, *prefilled]}
                if len(slots) >= w.slots:
                    victim = next((a for a in slots if a not in in_use), None)
                    if victim is None:
                        break  # every slot is busy: the request waits
                    del slots[victim]
                rec.transfer(Op.H2D, source + r.adapter, 0, nbytes, 0)
                hinted.discard(r.adapter)
            slots[r.adapter] = None
            slots.move_to_end(r.adapter)
            prefilled.append(waiting.pop(0))
        decoding = list(running)
        running.extend(prefilled)
        cost.step(decoding, prefilled)
        for r in running:
            r.generated += 1
        done = [r for r in running if r.generated >= r.output]
        for r in done:
            running.remove(r)
        upcoming = [
            a for a in dict.fromkeys(r.adapter for r in waiting) if a not in slots and a not in hinted
        ]
        for a in upcoming[: w.slots]:  # the engine hints the queue's next adapters, once each
            rec.transfer(Op.HINT, source + a, 0, nbytes, 0)
            hinted.add(a)
        rec.end_step(len(running) + len(done), 0.0)
    return rec.trace
