"""FlexGen weight offloading on a virtual clock, under plain, cc and PipeLLM.

FlexGen's schedule (FlexLLMGen `flex_opt.py`, `generation_loop_overlap_multi_batch`) per pass over
the layers: at layer j, issue layer j+1's weight load, then for each of the policy's GPU batches run
the layer (without a policy: layer j's load, issued right after layer j-1 launched). Where the KV
cache and hidden states live is the policy's (`FlexGenPolicy`); what crosses PCIe for one GPU batch
of one layer:
- hidden states on the CPU: the batch's hidden state goes down after the layer and comes up before
  the next (with several GPU batches, one batch ahead: FlexGen's `load_hidden(i, j, k + 1)`);
- KV cache on the GPU: nothing else; the layer is one GPU span (roofline);
- KV cache on the CPU with CPU attention (`--cpu-cache-compute`): the GPU computes q, k, v; q and the
  new K, V go down; the host computes attention over the cache in host memory (a "cpu" span: the
  host thread is busy and the GPU waits); its output comes up; the GPU finishes the layer;
- KV cache on the CPU, attention on the GPU: the whole K, V cache comes up, the new K, V go down;
- prefill: the layer computes the prompt on the GPU; its K, V (cache on the CPU) and hidden states
  (on the CPU) go down.
Weights stream in 1 MiB chunks, one stable `TransferKey` per chunk. Layers are identical, so the
timeline is periodic per layer; to keep a run under `max_requests` speculator calls only
`layers_in_cycle` layers are streamed in a cycle and the per-layer time is scaled to the model.

Deterministic: no threads, no wall clock, no randomness. See docs/sim.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from veil.pipellm import MiB, SpeculatorStats
from veil.pipellm.governor import GovernorConfig
from veil.pipellm.submission import DEFAULT_SUBMIT_CHUNKS
from veil.sim.hardware import (
    HardwareProfile,
    ModelProfile,
    cpu_attention_seconds,
    decode_layer_cost,
    decode_layer_seconds,
)
from veil.sim.replay import Mode, ReplayOptions, replay
from veil.trace import Op, Trace, TraceRecorder


@dataclass(frozen=True)
class FlexGenPolicy:
    """Where FlexGen keeps the KV cache and hidden states, and its batches (FlexLLMGen `Policy`).

    The weights' placement is `Scenario.offload_fraction` (FlexGen's `w_cpu_percent`).

    Attributes:
        gpu_batch_size: sequences per GPU batch (`--gpu-batch-size`).
        num_gpu_batches: GPU batches that share one weight load per layer (`--num-gpu-batches`);
            FlexGen's effective batch is `gpu_batch_size * num_gpu_batches`.
        cache_on_cpu: the KV cache lives in host memory (`cache_cpu_percent` 100); False: on the GPU.
        cpu_attention: with the cache on the CPU, decode attention runs on the host (`--cpu-cache-
            compute`); False copies the cache up each layer (FlexGen's "direct copy" path).
        acts_on_cpu: hidden states go to host memory after each layer and come back before the next
            (`act_cpu_percent` 100).
    FlexGen's `--overlap` (its default, and every published policy's) is always on: layer j+1's
    weights load while layer j computes.
    """

    gpu_batch_size: int
    num_gpu_batches: int = 1
    cache_on_cpu: bool = False
    cpu_attention: bool = True
    acts_on_cpu: bool = False

    def __post_init__(self) -> None:
        if self.gpu_batch_size < 1 or self.num_gpu_batches < 1:
            raise ValueError("gpu_batch_size and num_gpu_batches must be >= 1")

    @property
    def batch(self) -> int:
        """FlexGen's effective batch: sequences per step."""
        return self.gpu_batch_size * self.num_gpu_batches


@dataclass(frozen=True)
class Scenario:
    """One simulated configuration.

    Attributes:
        model: what is offloaded.
        hardware: GPU, link and CPU.
        batch: sequences decoded together (tokens per step).
        context_tokens: KV-cache length each sequence attends over (decode), or the prompt (prefill).
        steps: measured passes over the streamed layers (decode steps when all layers are streamed).
        warmup_steps: passes before measuring (the cyclic predictor learns the period in the first and
            confirms it early in the second).
        offload_fraction: share of each layer's weights kept on the host and streamed every step.
        depth: PipeLLM reservations ahead (`SpeculatorConfig.depth`).
        speculate: False turns PipeLLM's speculation off (every chunk is sealed on the host's path).
        max_requests: cap on chunk requests per run, which bounds `layers_in_cycle`.
        layer_compute_s: GPU time of one layer for the whole batch with the cache on the GPU; None
            estimates it from the profiles.
        policy: FlexGen's cache / activation placement and GPU batches; None: one GPU batch of
            `batch`, KV cache and hidden states on the GPU.
        prefill: simulate the prompt pass (`context_tokens` prompt tokens) instead of a decode step.
        decrypt_threads: PipeLLM's device-to-host decryption lanes (`ReplayOptions.decrypt_threads`).
        submit_chunks: PipeLLM's pre-sealed chunks per submission (`ReplayOptions.submit_chunks`).
    """

    model: ModelProfile
    hardware: HardwareProfile
    batch: int
    context_tokens: int = 512
    steps: int = 2
    warmup_steps: int = 2
    offload_fraction: float = 1.0
    depth: int = 32
    speculate: bool = True
    max_requests: int = 30_000
    layer_compute_s: float | None = None
    policy: FlexGenPolicy | None = None
    prefill: bool = False
    decrypt_threads: int = 1
    submit_chunks: int = DEFAULT_SUBMIT_CHUNKS

    def __post_init__(self) -> None:
        counts = (self.batch, self.steps, self.max_requests, self.decrypt_threads, self.submit_chunks)
        if min(counts) < 1 or self.warmup_steps < 0:
            names = "batch, steps, max_requests, decrypt_threads and submit_chunks"
            raise ValueError(f"{names} must be >= 1, warmup_steps >= 0")
        if not 0 < self.offload_fraction <= 1:
            raise ValueError(f"offload_fraction must be in (0, 1], got {self.offload_fraction}")
        if self.layer_compute_s is not None and self.layer_compute_s < 0:
            raise ValueError("layer_compute_s must be >= 0")
        if self.policy is not None and self.policy.batch != self.batch:
            raise ValueError(f"batch {self.batch} is not the policy's effective batch {self.policy.batch}")

    @property
    def flexgen(self) -> FlexGenPolicy:
        """The policy, or the resident one (`policy` None)."""
        return self.policy or FlexGenPolicy(self.batch)


@dataclass(frozen=True)
class Layout:
    """What one run streams: weight chunk lengths of one layer, the layer's other transfers (in
    chunks), how many layers cycle, GPU compute of one layer with the cache on the GPU."""

    chunk_lengths: tuple[int, ...]
    layers_in_cycle: int
    compute_s: float
    other_chunks: int = 0

    @property
    def requests(self) -> int:
        return (len(self.chunk_lengths) + self.other_chunks) * self.layers_in_cycle


def layout(scenario: Scenario) -> Layout:
    """The streamed chunks and the number of layers that fit the request budget (at least one)."""
    streamed = math.ceil(scenario.model.layer_bytes * scenario.offload_fraction)
    lengths = tuple(min(MiB, streamed - offset) for offset in range(0, streamed, MiB))
    compute_s = scenario.layer_compute_s
    if compute_s is None:
        compute_s = decode_layer_seconds(
            scenario.model, scenario.hardware, batch=scenario.batch, context_tokens=scenario.context_tokens
        )
    one = _FlexGenPass(scenario, Layout(lengths, 1, compute_s))
    one.prologue()
    one.layer(0)
    transfers = one.rec.trace.transfers(Op.H2D, Op.D2H)
    other = sum(math.ceil(t.nbytes / MiB) for t in transfers if t.source_id >= KV_SOURCE)  # not weights
    passes = scenario.warmup_steps + scenario.steps
    per_layer = len(lengths) + other
    layers = max(1, min(scenario.model.layers, scenario.max_requests // (passes * per_layer)))
    return Layout(lengths, layers, compute_s, other)


@dataclass(frozen=True)
class ModeResult:
    """One mode's figures. Times are virtual seconds.

    Attributes:
        tokens_per_s: batch / (per-layer time x model layers).
        layer_s: mean time per streamed layer in the measured passes.
        wait_s: host time spent in `Wait` (pipellm), over all passes.
        worker_busy_s: modelled sealing time of the spare cores (pipellm), over all passes.
        stats: the speculator's counters (pipellm), over all passes.
        ivs: every emitted IV in emission order, if recorded.
    """

    mode: Mode
    tokens_per_s: float
    layer_s: float
    wait_s: float = 0.0
    worker_busy_s: float = 0.0
    stats: SpeculatorStats | None = None
    ivs: tuple[int, ...] | None = None


def simulate(scenario: Scenario, mode: Mode, *, record_ivs: bool = False) -> ModeResult:
    """Run `scenario` under `mode` and measure its steady-state throughput."""
    lay = layout(scenario)
    options = ReplayOptions(
        depth=scenario.depth,
        speculate=scenario.speculate,
        recorded_compute=True,
        warmup_steps=scenario.warmup_steps,
        record_ivs=record_ivs,
        max_period=max(lay.requests, 1),
        governor=GovernorConfig(enabled=False),  # the paper's PipeLLM always speculates
        decrypt_threads=scenario.decrypt_threads,
        submit_chunks=scenario.submit_chunks,
    )
    result = replay(flexgen_trace(scenario, lay), scenario.hardware, mode, options)
    layer_s = (result.step_ends[-1] - result.start_s) / (scenario.steps * lay.layers_in_cycle)
    tokens_per_s = scenario.batch / (layer_s * scenario.model.layers)
    return ModeResult(
        mode, tokens_per_s, layer_s, result.wait_s, result.worker_busy_s, result.stats, result.ivs
    )


def flexgen_trace(scenario: Scenario, lay: Layout) -> Trace:
    """FlexGen's schedule as a trace: per pass, each streamed layer's events (module docstring)."""
    flexgen = _FlexGenPass(scenario, lay)
    for i in range(scenario.warmup_steps + scenario.steps):
        flexgen.rec.begin_step()
        if i == 0:
            flexgen.prologue()
        for layer in range(lay.layers_in_cycle):
            flexgen.layer(layer)
        flexgen.rec.end_step(scenario.batch, 0.0)
    return flexgen.rec.trace


KV_SOURCE = 1 << 20  # host buffers apart from the weights (source id = layer): KV cache of (layer, batch)
ACT_SOURCE = 1 << 24  # hidden states and CPU-attention workspaces of each GPU batch


class _FlexGenPass:
    """Writes FlexGen's events for one layer at a time; tracks which transfer each span needs and
    the write versions of host buffers (a device-to-host copy or the host's own compute writes one)."""

    def __init__(self, scenario: Scenario, lay: Layout) -> None:
        self.sc, self.lay, self.policy = scenario, lay, scenario.flexgen
        self.rec = TraceRecorder(workload="offload", model=scenario.model.name, batch=scenario.batch)
        self._weights_at: dict[int, int] = {}  # layer -> its latest weight load (data transfer count)
        self._hidden_at: dict[int, int] = {}  # GPU batch -> its latest hidden-state load
        self._needed_weights = 0  # the weight load the current layer computes with
        self._versions: dict[int, int] = {}

    def prologue(self) -> None:
        """FlexGen loads layer 0's weights (and, prefetching, the first batch's hidden state) before
        the first pass (with a policy)."""
        if self.sc.policy is not None:
            self._load_weights(0)
        if self._prefetch:
            self._load_hidden(0)

    def layer(self, j: int) -> None:
        """Layer j (of the cycle): a weight load, then each GPU batch. FlexGen issues layer j+1's load
        before layer j's first batch, on the same host thread (so cc seals it before j launches);
        without a policy the host issues layer j's load right after launching layer j-1."""
        batches = self.policy.num_gpu_batches
        self._needed_weights = self._weights_at.get(j, 0)  # before the next load, which may be j again
        if self.policy.acts_on_cpu and batches == 1:
            # FlexGen copies it on another CUDA stream than the weights; on our one in-order link it
            # goes first so that it does not wait for the next layer's weights
            self._load_hidden(0)
        if self.sc.policy is None:
            self._load_weights(j)
            self._needed_weights = self._weights_at[j]
        else:
            self._load_weights((j + 1) % self.lay.layers_in_cycle)
        for k in range(batches):
            if self._prefetch:  # FlexGen's `load_hidden(i, j, k + 1)` before computing batch k
                self._load_hidden((k + 1) % batches)
            self._gpu_batch(j, k)

    @property
    def _prefetch(self) -> bool:
        """Hidden states on the CPU with several GPU batches: each batch's comes up one batch ahead."""
        return self.policy.acts_on_cpu and self.policy.num_gpu_batches > 1

    def _hidden_bytes(self) -> int:
        tokens = self.policy.gpu_batch_size * (self.sc.context_tokens if self.sc.prefill else 1)
        return 2 * tokens * self.sc.model.hidden  # fp16

    def _load_hidden(self, k: int) -> None:
        self._hidden_at[k] = self._h2d(ACT_SOURCE + 4 * k, self._hidden_bytes())

    def _gpu_batch(self, j: int, k: int) -> None:
        m, p, ctx = self.sc.model, self.policy, self.sc.context_tokens
        b, tokens = p.gpu_batch_size, p.gpu_batch_size * (ctx if self.sc.prefill else 1)
        needs = max(self._needed_weights, self._hidden_at.get(k, 0) if p.acts_on_cpu else 0)
        kv_buffer = KV_SOURCE + 64 * j + k
        if self.sc.prefill:
            self._gpu(*self._prefill_cost(), needs)
            if p.cache_on_cpu:
                self._d2h(kv_buffer, 2 * tokens * m.kv_dim * m.bytes_per_param)
        elif not p.cache_on_cpu:
            self._gpu(*decode_layer_cost(m, batch=b, context_tokens=ctx), needs, self._resident_s())
        elif p.cpu_attention:
            self._gpu(2 * b * m.qkv_params, m.qkv_params * m.bytes_per_param, needs)
            # q goes down in fp32 (`q.float().cpu()`), the new K and V in fp16
            self._d2h(ACT_SOURCE + 4 * k + 1, 4 * b * m.hidden + 2 * b * m.kv_dim * m.bytes_per_param)
            attention_s = cpu_attention_seconds(m, self.sc.hardware, batch=b, context_tokens=ctx)
            self.rec.compute(0.0, 0.0, attention_s, self.rec.data_transfers, "cpu")
            value = self._h2d(ACT_SOURCE + 4 * k + 2, 4 * b * m.hidden, written=True)  # fp32 output up
            rest = m.params_per_layer - m.qkv_params
            self._gpu(2 * b * rest, rest * m.bytes_per_param, value)
        else:
            kv = self._h2d(kv_buffer, 2 * b * ctx * m.kv_dim * m.bytes_per_param)
            self._gpu(*decode_layer_cost(m, batch=b, context_tokens=ctx), kv)
            self._d2h(kv_buffer, 2 * b * m.kv_dim * m.bytes_per_param)
        if p.acts_on_cpu:
            self._d2h(ACT_SOURCE + 4 * k, self._hidden_bytes())

    def _prefill_cost(self) -> tuple[float, float]:
        """(FLOPs, HBM bytes) of one GPU batch's prompt through one layer: 2 per weight per token
        plus causal attention (2 x prompt^2 x hidden per sequence); reads the weights and writes K, V."""
        m, b, s = self.sc.model, self.policy.gpu_batch_size, self.sc.context_tokens
        flops = b * s * 2 * m.params_per_layer + b * 2 * s * s * m.hidden
        return flops, m.layer_bytes + 2 * b * s * m.kv_dim * m.bytes_per_param

    def _resident_s(self) -> float | None:
        """GPU time of a batch with the cache on the GPU: the scenario's layer time split over the GPU
        batches if it was given or there is no policy; None: the roofline of the GPU batch."""
        if self.sc.layer_compute_s is None and self.sc.policy is not None:
            return None
        return self.lay.compute_s / self.policy.num_gpu_batches

    def _gpu(self, flops: float, nbytes: float, needs: int, seconds: float | None = None) -> None:
        if seconds is None:
            seconds = self.sc.hardware.compute_seconds(flops, nbytes)
        self.rec.compute(flops, nbytes, seconds, needs)

    def _load_weights(self, j: int) -> None:
        streamed = sum(self.lay.chunk_lengths)
        self._weights_at[j] = self._h2d(j, streamed)

    def _h2d(self, source: int, nbytes: int, *, written: bool = False) -> int:
        """A host-to-device copy of `source` (`written`: the host wrote it first); returns its count."""
        if written:
            self._versions[source] = self._versions.get(source, 0) + 2
        self.rec.transfer(Op.H2D, source, 0, nbytes, self._versions.get(source, 0))
        return self.rec.data_transfers

    def _d2h(self, source: int, nbytes: int) -> int:
        """A device-to-host copy into `source`; the replay bumps its version as the copy writes it."""
        version = self._versions.get(source, 0)
        self.rec.transfer(Op.D2H, source, 0, nbytes, version)
        self._versions[source] = version + 2
        return self.rec.data_transfers


@dataclass(frozen=True)
class Comparison:
    """The three modes on one scenario.

    Attributes:
        gap_closure: (pipellm - cc) / (plain - cc) in tokens/s; None when cc costs nothing.
        cc_drop: 1 - cc / plain (the paper's "throughput drop" with CC on).
        pipellm_cost: 1 - pipellm / plain (the paper claims < 19.6%).
    """

    layout: Layout
    plain: ModeResult
    cc: ModeResult
    pipellm: ModeResult

    @property
    def gap_closure(self) -> float | None:
        gap = self.plain.tokens_per_s - self.cc.tokens_per_s
        if gap <= 1e-9 * self.plain.tokens_per_s:
            return None
        return (self.pipellm.tokens_per_s - self.cc.tokens_per_s) / gap

    @property
    def cc_drop(self) -> float:
        return 1 - self.cc.tokens_per_s / self.plain.tokens_per_s

    @property
    def pipellm_cost(self) -> float:
        return 1 - self.pipellm.tokens_per_s / self.plain.tokens_per_s


def compare(scenario: Scenario) -> Comparison:
    """Simulate all three modes on `scenario`."""
    return Comparison(
        layout(scenario),
        simulate(scenario, Mode.PLAIN),
        simulate(scenario, Mode.CC),
        simulate(scenario, Mode.PIPELLM),
    )
