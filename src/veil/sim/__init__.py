"""Discrete-event simulator: PipeLLM's real policy on modelled hardware (see docs/sim.md)."""

from veil.sim.hardware import H100_SXM_PCIE5, MODELS, HardwareProfile, ModelProfile, decode_layer_seconds
from veil.sim.replay import ReplayOptions, ReplayResult, replay
from veil.sim.simulator import Comparison, Layout, Mode, ModeResult, Scenario, compare, layout, simulate

__all__ = [
    "H100_SXM_PCIE5",
    "MODELS",
    "Comparison",
    "HardwareProfile",
    "Layout",
    "Mode",
    "ModeResult",
    "ModelProfile",
    "ReplayOptions",
    "ReplayResult",
    "Scenario",
    "compare",
    "decode_layer_seconds",
    "layout",
    "replay",
    "simulate",
]
