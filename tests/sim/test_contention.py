"""Replays on an emulated device whose lanes share host cores; PipeLLM's governor on the virtual clock."""

from __future__ import annotations

import dataclasses

import pytest

from veil.pipellm import MiB
from veil.pipellm.governor import GovernorConfig
from veil.sim.hardware import GB, HardwareProfile
from veil.sim.replay import Mode, ReplayOptions, replay
from veil.trace import Compute, Op, Step, Trace, Transfer

EMULATED = HardwareProfile(
    name="emulated device",
    pcie_h2d_bytes_per_s=4 * GB,
    pcie_d2h_bytes_per_s=4 * GB,
    aes_gcm_bytes_per_s=1 * GB,
    device_crypto_bytes_per_s=2 * GB,
    duplex=False,
    compute_on_host=True,
    spare_cores=1,
    message_s=1e-5,
)
OPTIONS = ReplayOptions(recorded_compute=True, warmup_steps=5)


def _streaming_trace(
    layers: int = 4, steps: int = 24, nbytes: int = 4 * MiB, compute_s: float = 0.006
) -> Trace:
    """Weight streaming: each layer's load is issued before the previous layer computes (double
    buffering, the same buffers every step); a layer computes once its own load has landed."""
    out = [Step([Transfer(Op.H2D, 0, 0, nbytes, 0)], tokens=0, seconds=0.0)]
    for step in range(steps):
        events: list[Transfer | Compute] = []
        for layer in range(layers):
            done = step * layers + layer  # layers computed before this one
            events.append(Transfer(Op.H2D, (layer + 1) % layers, 0, nbytes, 0))
            events.append(Compute(0.0, 0.0, compute_s, needs=done + 1))
        out.append(Step(events, tokens=1, seconds=0.0))
    return Trace(out)


def test_lanes_sharing_one_core_are_slower_than_lanes_with_cores_of_their_own() -> None:
    trace = _streaming_trace()
    own = replay(trace, EMULATED, Mode.CC, OPTIONS)
    shared = replay(trace, dataclasses.replace(EMULATED, host_cores=1), Mode.CC, OPTIONS)
    # per layer: the caller seals the next layer (4.2 ms) and computes this one (6 ms); the copy
    # engine's 3.1 ms run beside that on a core of its own, or in turn on the one core
    layer_own = 4 * MiB / GB + 0.006 + 4 * 1e-5
    layer_shared = layer_own + 4 * MiB * (1 / (4 * GB) + 1 / (2 * GB))
    assert 1 / own.tokens_per_s == pytest.approx(4 * layer_own, rel=0.03)
    assert 1 / shared.tokens_per_s == pytest.approx(4 * layer_shared, rel=0.03)
    loads, layers = 1 + 24 * 4, 24 * 4  # every load's work and every layer's compute, once each
    assert shared.host_work_s == pytest.approx(loads * (layer_shared - 0.006) + layers * 0.006, rel=1e-6)


def test_the_governor_keeps_speculation_where_a_core_is_free_and_falls_back_where_none_is() -> None:
    trace = _streaming_trace()
    free = dataclasses.replace(EMULATED, host_cores=3)
    busy = dataclasses.replace(EMULATED, host_cores=1)
    results = {
        (name, mode): replay(trace, hw, mode, OPTIONS)
        for name, hw in (("free", free), ("busy", busy))
        for mode in (Mode.CC, Mode.PIPELLM)
    }
    fast = results["free", Mode.PIPELLM]
    assert fast.tokens_per_s > 1.2 * results["free", Mode.CC].tokens_per_s  # the worker seals beside compute
    slow = results["busy", Mode.PIPELLM]
    assert slow.tokens_per_s < 1.05 * results["busy", Mode.CC].tokens_per_s  # no core to seal ahead on
    assert fast.governor is not None and slow.governor is not None
    assert fast.governor.speculate_s_per_gib < 0.9 * fast.governor.seal_in_caller_s_per_gib
    assert slow.governor.speculate_s_per_gib > 0.9 * slow.governor.seal_in_caller_s_per_gib
    assert fast.stats is not None and slow.stats is not None
    assert slow.stats.hits / slow.stats.requests < 0.5 < fast.stats.hits / fast.stats.requests


def test_pinning_speculation_on_ignores_the_governor() -> None:
    pinned = dataclasses.replace(OPTIONS, governor=GovernorConfig(enabled=False))
    busy = dataclasses.replace(EMULATED, host_cores=1)
    result = replay(_streaming_trace(), busy, Mode.PIPELLM, pinned)
    assert result.governor is not None and result.governor.windows == 0
    assert result.stats is not None and result.stats.hits > 0.8 * result.stats.requests
