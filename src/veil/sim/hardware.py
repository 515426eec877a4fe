"""Hardware and model profiles of the simulator, with their sources and assumptions.

Figures are public specifications or typical published measurements, rounded; where a figure is an
assumption rather than a source, the comment says so. Every profile is a frozen dataclass: derive a
variant with `dataclasses.replace`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

GB = 1e9
TFLOP = 1e12


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU behind PCIe and the CPU that seals its host-to-device traffic.

    Attributes:
        name: label for reports.
        pcie_h2d_bytes_per_s: effective host-to-device copy bandwidth with CC off. PCIe 5.0 x16 is
            64 GB/s raw per direction; pinned `cudaMemcpy` reaches about 50-55 GB/s on H100 hosts.
            CC on is assumed to keep this link rate (the copy engine decrypts at line rate in
            hardware); only the CPU's sealing is added.
        aes_gcm_bytes_per_s: AES-256-GCM sealing rate of one core with AES-NI + PCLMULQDQ (OpenSSL on
            server Xeons / EPYCs: about 2.5-4 GB/s per core for 1 MiB messages).
        aes_gcm_vaes_bytes_per_s: the same with VAES / VPCLMULQDQ (Ice Lake and later, Zen 4): about
            8-12 GB/s per core; this repository measures about 10 GB/s on one core of its CI machine.
        vaes: seal at the VAES rate instead of the AES-NI rate.
        spare_cores: CPU cores free to seal ahead for PipeLLM (an assumption: a confidential VM with
            16-32 vCPUs, minus the serving process's own threads).
        gpu_flops: dense bf16/fp16 tensor throughput; H100 SXM is 989 TFLOP/s (H100 PCIe 756).
        flops_efficiency: share of `gpu_flops` that decode kernels reach (assumption: 0.5).
        hbm_bytes_per_s: H100 SXM HBM3 bandwidth, 3.35 TB/s (H100 PCIe HBM2e: 2.0 TB/s).
        hbm_efficiency: share of `hbm_bytes_per_s` that decode kernels reach (assumption: 0.8).
        message_s: fixed host cost of one message, data or NOP (driver call, bounce-buffer slot,
            doorbell): a few microseconds (assumption: 4 us), in every mode.
        commit_s: host cost of each further pre-sealed chunk PipeLLM submits with the first
            (`pipellm.submission`; the first costs `message_s`): its speculator decision and its
            copy command, a fraction of a microsecond in a driver (assumption: 0.5 us). veil's
            Python transport measures far more (`calibrate`).
        pcie_d2h_bytes_per_s: device-to-host copy bandwidth; PCIe is symmetric (assumption: as h2d).
        aes_gcm_open_bytes_per_s: one host core's AES-256-GCM decryption rate (None: the sealing
            rate; GCM decryption does the same work, assumption confirmed within 10% here).
        device_crypto_bytes_per_s: rate at which the device side opens h2d and seals d2h messages;
            None for the H100's copy engine, which does it in hardware at line rate (NVIDIA CC
            whitepaper). Set for the emulated device, whose copy engine is one CPU thread.
        duplex: True if the two directions have separate links (PCIe); False if one engine carries
            both in turn (the emulated copy engine).
        compute_on_host: True if compute runs on the host thread itself (the emulated device), so
            the host can issue nothing while a span computes; False for a GPU (asynchronous launch).
        gpu_memory_bytes: device memory; H100 SXM has 80 GB HBM3 (datasheet).
        gpu_memory_usable: share of it a serving engine may fill with weights and KV cache
            (assumption: 0.9, vLLM's default `gpu_memory_utilization`).
        host_cores: cores shared by every host lane (the caller, sealing workers, the decryption
            thread and, with `compute_on_host`, the emulated copy engine and compute); None models
            no contention (each lane has a core of its own: the H100 profile's `spare_cores`).
        host_parallel: single-core speeds all `host_cores` deliver at once (measured; None:
            `host_cores`). Only used with `host_cores` and without `host_pairs`.
        host_pairs: measured speed of each kind of lane beside each other kind busy on another core
            (`pairs[a][b]`, kinds "compute", "seal", "open", "copy"; `veil.bench.transfer.
            pair_contention`), in place of the one `host_parallel` (`veil.sim.cores.PairSpeeds`);
            None: not measured. Only used with `host_cores`.
        cpu_attention_bytes_per_s: host DRAM traffic rate FlexGen's CPU attention reaches (its
            PyTorch path is memory-bound: see `cpu_attention_seconds`). Assumed 100 GB/s for a
            Sapphire Rapids / Genoa host (one socket's 8-12 DDR5 channels peak at 300-460 GB/s;
            STREAM-like kernels reach about 2/3 of that, PyTorch's fp16-to-fp32 conversion and
            small batched GEMVs less). Cross-check: FlexGen's cost model fits 0.0123 TFLOP/s of
            CPU attention on its GCP T4 host (`experimental/cost_model.py`, `cpu_flops`), which is
            61.5 GB/s under the same 20 bytes per 4 FLOPs.
    """

    name: str
    pcie_h2d_bytes_per_s: float = 50 * GB
    aes_gcm_bytes_per_s: float = 3.5 * GB
    aes_gcm_vaes_bytes_per_s: float = 10 * GB
    vaes: bool = False
    spare_cores: int = 8
    gpu_flops: float = 989 * TFLOP
    flops_efficiency: float = 0.5
    hbm_bytes_per_s: float = 3350 * GB
    hbm_efficiency: float = 0.8
    message_s: float = 4e-6
    commit_s: float = 0.5e-6
    pcie_d2h_bytes_per_s: float = 50 * GB
    aes_gcm_open_bytes_per_s: float | None = None
    device_crypto_bytes_per_s: float | None = None
    duplex: bool = True
    compute_on_host: bool = False
    gpu_memory_bytes: float = 80 * GB
    gpu_memory_usable: float = 0.9
    host_cores: int | None = None
    host_parallel: float | None = None
    host_pairs: Mapping[str, Mapping[str, float]] | None = None
    cpu_attention_bytes_per_s: float = 100 * GB

    def __post_init__(self) -> None:
        rates = (self.pcie_h2d_bytes_per_s, self.aes_gcm_bytes_per_s, self.aes_gcm_vaes_bytes_per_s)
        if min((*rates, self.gpu_flops, self.hbm_bytes_per_s, self.cpu_attention_bytes_per_s)) <= 0:
            raise ValueError("bandwidths, sealing rates and FLOP/s must be > 0")
        if not (0 < self.flops_efficiency <= 1 and 0 < self.hbm_efficiency <= 1):
            raise ValueError("flops_efficiency and hbm_efficiency must be in (0, 1]")
        if self.spare_cores < 0 or self.message_s < 0 or self.commit_s < 0:
            raise ValueError("spare_cores, message_s and commit_s must be >= 0")
        if self.host_cores is not None and self.host_cores < 1:
            raise ValueError(f"host_cores must be >= 1 or None, got {self.host_cores}")
        if self.host_parallel is not None and self.host_parallel <= 0:
            raise ValueError(f"host_parallel must be > 0 or None, got {self.host_parallel}")

    @property
    def seal_bytes_per_s(self) -> float:
        """Sealing rate of one core, AES-NI or VAES as configured."""
        return self.aes_gcm_vaes_bytes_per_s if self.vaes else self.aes_gcm_bytes_per_s

    @property
    def open_bytes_per_s(self) -> float:
        """Decryption rate of one host core."""
        return self.aes_gcm_open_bytes_per_s or self.seal_bytes_per_s

    def compute_seconds(self, flops: float, nbytes: float) -> float:
        """Roofline time of a compute span: the slower of its FLOPs and its memory reads."""
        return max(
            flops / (self.gpu_flops * self.flops_efficiency),
            nbytes / (self.hbm_bytes_per_s * self.hbm_efficiency),
        )


H100_SXM_PCIE5 = HardwareProfile(name="H100 SXM, PCIe 5 x16, AES-NI host")


@dataclass(frozen=True)
class ModelProfile:
    """Decoder-only transformer shapes (public architecture numbers).

    Attributes:
        name: label for reports and `--model`.
        layers: decoder layers (each streamed in full when offloaded).
        hidden: model width.
        intermediate: MLP width.
        kv_dim: width of K (and of V) per layer: `hidden` for multi-head attention, less with GQA.
        params_per_layer: weights of one decoder layer, biases and norms included.
        bytes_per_param: 2 for fp16 / bf16 weights.
    """

    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    params_per_layer: int
    bytes_per_param: int = 2

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.intermediate, self.kv_dim, self.params_per_layer) < 1:
            raise ValueError("layers, widths and params_per_layer must be >= 1")
        if self.bytes_per_param < 1:
            raise ValueError("bytes_per_param must be >= 1")

    @property
    def layer_bytes(self) -> int:
        return self.params_per_layer * self.bytes_per_param

    @property
    def qkv_params(self) -> int:
        """Weights of the q, k and v projections of one layer (computed before attention)."""
        return self.hidden * (self.hidden + 2 * self.kv_dim)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every decoder layer (embeddings and head are left out, as they are not streamed)."""
        return self.layers * self.layer_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return 2 * self.layers * self.kv_dim * self.bytes_per_param


def _opt(name: str, layers: int, hidden: int) -> ModelProfile:
    """OPT (Zhang et al. 2022, table 1): MHA, MLP width 4 x hidden, biases everywhere, 2 LayerNorms."""
    ffn = 4 * hidden
    params = 4 * hidden * hidden + 4 * hidden + 2 * hidden * ffn + ffn + hidden + 4 * hidden
    return ModelProfile(name, layers, hidden, ffn, hidden, params)


def _llama2(name: str, layers: int, hidden: int, intermediate: int, kv_dim: int) -> ModelProfile:
    """Llama 2 (Touvron et al. 2023; HF configs): no biases, SwiGLU MLP (3 matrices), 2 RMSNorms."""
    params = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate + 2 * hidden
    return ModelProfile(name, layers, hidden, intermediate, kv_dim, params)


MODELS: dict[str, ModelProfile] = {
    m.name: m
    for m in (
        _opt("opt-13b", 40, 5120),
        _opt("opt-30b", 48, 7168),
        _opt("opt-66b", 64, 9216),
        _opt("opt-175b", 96, 12288),
        _llama2("llama-2-7b", 32, 4096, 11008, 4096),
        _llama2("llama-2-13b", 40, 5120, 13824, 5120),
        _llama2("llama-2-70b", 80, 8192, 28672, 1024),  # GQA: 8 KV heads of 128
    )
}


def decode_layer_seconds(
    model: ModelProfile, hardware: HardwareProfile, *, batch: int, context_tokens: int
) -> float:
    """FlexGen-style roofline of one decoder layer for one decode step of `batch` sequences.

    max(FLOPs / (FLOP/s x efficiency), HBM bytes / (HBM bandwidth x efficiency)), where FLOPs are
    2 per weight per token plus attention (4 x context x hidden per token), and HBM bytes are the
    layer's weights (read once per step) plus every sequence's K and V cache. Assumes the KV cache is
    on the GPU and attention runs there.
    """
    if batch < 1 or context_tokens < 0:
        raise ValueError(f"batch must be >= 1 and context_tokens >= 0, got {batch}, {context_tokens}")
    return hardware.compute_seconds(*decode_layer_cost(model, batch=batch, context_tokens=context_tokens))


def decode_layer_cost(model: ModelProfile, *, batch: int, context_tokens: int) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one decoder layer for one decode step (see `decode_layer_seconds`)."""
    flops = batch * (2 * model.params_per_layer + 4 * context_tokens * model.hidden)
    kv_bytes = batch * 2 * context_tokens * model.kv_dim * model.bytes_per_param
    return flops, model.layer_bytes + kv_bytes


# FlexGen's CPU attention (FlexLLMGen `pytorch_backend.mha_gen`, `--cpu-cache-compute`) per element
# of batch x context x kv width: it reads K and V in fp16 (2 x 2 bytes), converts both to fp32 copies
# (`k.float()`, `v.float()`: 2 x 4 bytes written) and its two batched matmuls read those (2 x 4 bytes).
CPU_ATTENTION_BYTES_PER_ELEMENT = 20


def cpu_attention_seconds(
    model: ModelProfile, hardware: HardwareProfile, *, batch: int, context_tokens: int
) -> float:
    """Host time of one layer's decode attention over a KV cache in host memory (FlexGen's
    `--cpu-cache-compute`): memory-bound, `CPU_ATTENTION_BYTES_PER_ELEMENT` bytes per element of
    K and V at `hardware.cpu_attention_bytes_per_s`. Its 4 FLOPs per element are far below what
    the host's vector units do in that time, so FLOPs are not counted."""
    if batch < 1 or context_tokens < 0:
        raise ValueError(f"batch must be >= 1 and context_tokens >= 0, got {batch}, {context_tokens}")
    elements = batch * context_tokens * model.kv_dim
    return elements * CPU_ATTENTION_BYTES_PER_ELEMENT / hardware.cpu_attention_bytes_per_s
