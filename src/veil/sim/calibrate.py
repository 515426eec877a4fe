"""A hardware profile of this machine's emulated device, calibrated from measurements.

Inputs are the JSON outputs of `veil bench transfer` (one core's AES-GCM sealing rate and memcpy
rate) and `veil bench model` (veil's decode tokens/s at batch 1 and 8), plus the model's shape. The
emulated device differs from an H100 in ways the profile states:
- its copy engine is one CPU thread that opens every h2d message and seals every d2h one in software
  (`device_crypto_bytes_per_s` = the sealing rate; GCM opens as fast as it seals, within 10% here)
  and copies both directions in turn (`duplex=False`), at the memcpy rate (the "link");
- compute runs on the host thread (`compute_on_host`), at a roofline fitted to the model benchmark:
  batch 1 decode is taken as memory-bound (weights read once per token: bytes / time gives the
  bandwidth) and batch 8 as compute-bound where it is slower than that bandwidth allows (FLOPs / time);
- PipeLLM's sealing workers: the runtime's default, one thread (`default_workers()` on 2 cores), with
  no contention modelled against compute and the copy engine (all three share 2 cores here);
- a message's fixed host cost is assumed 100 us (Python transport, events, ring slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from veil.sim.hardware import GB, HardwareProfile

MESSAGE_S = 100e-6  # assumed fixed host cost of one message in veil's Python transport


@dataclass(frozen=True)
class ModelShape:
    """What the roofline fit needs of the benchmarked model (veil runs it in fp32)."""

    params: int  # every weight read per decode step (decoder layers, embedding-free head)
    bytes_per_param: int = 4

    def step_cost(self, batch: int) -> tuple[float, float]:
        """(FLOPs, bytes) of one decode step of `batch` sequences (short contexts: attention ignored)."""
        return 2.0 * self.params * batch, float(self.params * self.bytes_per_param)


def machine_profile(
    transfer: dict[str, Any], model_bench: dict[str, Any], shape: ModelShape, *, workers: int = 1
) -> HardwareProfile:
    """The emulated device on this machine.

    Args:
        transfer: `veil bench transfer --json` output (`raw_aesgcm_gbps`, `memcpy_gbps`).
        model_bench: `veil bench model --json` output with batches "1" and "8".
        shape: the benchmarked model.
        workers: PipeLLM sealing threads.

    Raises:
        KeyError: if a figure is missing from the inputs.
    """
    seal = float(transfer["raw_aesgcm_gbps"]) * GB
    copy = float(transfer["memcpy_gbps"]) * GB
    step_s = {int(b): int(b) / float(r["veil_tokens_per_s"]) for b, r in model_bench["batch"].items()}
    _, bytes_1 = shape.step_cost(1)
    bandwidth = bytes_1 / step_s[1]
    flops_8, bytes_8 = shape.step_cost(8)
    memory_bound_8 = bytes_8 / bandwidth
    flops_rate = flops_8 / step_s[8] if step_s[8] > memory_bound_8 else flops_8 / memory_bound_8
    return HardwareProfile(
        name="this machine (emulated device, calibrated)",
        pcie_h2d_bytes_per_s=copy,
        pcie_d2h_bytes_per_s=copy,
        aes_gcm_bytes_per_s=seal,
        aes_gcm_vaes_bytes_per_s=seal,
        device_crypto_bytes_per_s=seal,
        duplex=False,
        compute_on_host=True,
        spare_cores=workers,
        gpu_flops=flops_rate,
        flops_efficiency=1.0,
        hbm_bytes_per_s=bandwidth,
        hbm_efficiency=1.0,
        message_s=MESSAGE_S,
    )
