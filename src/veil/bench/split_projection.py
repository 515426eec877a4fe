"""Projecting the four split-inference setups onto an H100 server and an SGX-class client CPU.

A roofline estimate, not a measurement: each pass over the weights costs max(FLOPs / sustained FLOP/s,
weight bytes / sustained bandwidth); each round trip costs the link's RTT plus bytes / bandwidth. The
figures and their sources are in the profiles below; where a figure is an assumption it says so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense matmul FLOP/s at the dtype used
    mem_bw: float  # bytes/s
    flops_efficiency: float  # sustained / peak (assumption)
    bw_efficiency: float  # sustained / peak (assumption)
    tee_slowdown: float = 1.0  # multiplier on time when run inside the TEE (assumption)
    note: str = ""

    def pass_s(self, flops: float, bytes_read: float) -> float:
        return max(
            flops / (self.peak_flops * self.flops_efficiency), bytes_read / (self.mem_bw * self.bw_efficiency)
        )


H100 = Device(
    "H100 SXM5",
    989e12,
    3.35e12,
    0.5,
    0.8,
    note="NVIDIA H100 datasheet: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3; efficiencies assumed",
)
SGX_CLIENT = Device(
    "Xeon (Ice Lake SP) with SGX2, 16 cores",
    16 * 2.0e9 * 2 * 16 * 2,
    8 * 25.6e9,
    0.5,
    0.7,
    tee_slowdown=1.3,
    note="16 cores x 2.0 GHz x 2 AVX-512 FMA units x 16 fp32 lanes x 2 = 2.05 TFLOP/s; 8 x DDR4-3200 = "
    "204.8 GB/s; SGX2 memory-encryption and enclave-transition cost assumed +30%; model fits the EPC",
)


@dataclass(frozen=True)
class Link:
    rtt_s: float
    bytes_per_s: float
    note: str = ""

    def round_trip_s(self, bytes_moved: float) -> float:
        return self.rtt_s + bytes_moved / self.bytes_per_s


WAN = Link(0.010, 125e6, note="client to cloud: 10 ms RTT, 1 Gbit/s (assumption)")


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_hidden: int  # num_kv_heads * head_dim
    weight_bytes_per_param: float = 2.0  # fp16/bf16 on both sides

    @property
    def layer_params(self) -> int:
        return (
            self.hidden * (self.hidden + 2 * self.kv_hidden)
            + self.hidden * self.hidden
            + 3 * self.hidden * self.intermediate
        )

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + self.vocab * self.hidden  # tied head counted once


LLAMA2_7B = ModelShape("Llama-2-7B", 32, 4096, 11008, 32000, 4096)


@dataclass(frozen=True)
class Projection:
    plain_s: float
    cmif_s: float
    tee_only_s: float
    partition_s: float


def project(
    model: ModelShape,
    prompt_tokens: int,
    new_tokens: int,
    *,
    server: Device = H100,
    client: Device = SGX_CLIENT,
    link: Link = WAN,
    sanitize_fraction: float = 0.0,
) -> Projection:
    """Latency of one request per setup. `sanitize_fraction`: the sanitizer's measured share of CMIF."""
    weight_bytes = model.params * model.weight_bytes_per_param

    def run(device: Device) -> float:  # prefill, then one pass per new token (batch 1)
        prefill = device.pass_s(2 * model.params * prompt_tokens, weight_bytes)
        decode = device.pass_s(2 * model.params, weight_bytes)
        return (prefill + (new_tokens - 1) * decode) * device.tee_slowdown

    plain = link.round_trip_s(4 * (prompt_tokens + new_tokens)) + run(server)
    embeds = prompt_tokens * model.hidden * 4  # fp32 embeddings, as sent here
    cmif = (link.round_trip_s(embeds + 4 * new_tokens) + run(server)) / (1 - sanitize_fraction)
    tee_only = run(client)
    per_step = 4 * model.num_layers + 1
    # fp32 activations out and back per layer: wqkv, wo, w_gate_up, w_down; then the head's logits
    activations = 4 * (6 * model.hidden + 2 * model.kv_hidden + 3 * model.intermediate)
    head = 4 * (model.hidden + model.vocab)
    partition = run(server)  # the linear maps dominate the FLOPs; non-linear parts on the client are small
    for tokens in [prompt_tokens] + [1] * (new_tokens - 1):
        moved = tokens * model.num_layers * activations + head
        partition += per_step * link.rtt_s + moved / link.bytes_per_s
    return Projection(plain, cmif, tee_only, partition)
