"""Transports: the one interface engines use to cross the host-device boundary, and its three kinds.

- `base`: the `Transport` ABC, `TransportKind`, `TransportOptions`, `TransportStats`; `Phase` (what
  an engine's transfers are for, `Transport.enter_phase`) is `veil.pipellm.governor`'s.
- `plain`: no confidential computing (the baseline).
- `sealed`: `SealedTransport` (what every sealed transport shares) and `cc` (seal in the caller).
- `pipellm`: speculative pipelined encryption.

`make_transport` is the one place that maps kinds to classes. This package sits above `veil.cc` (the
protocol) and `veil.pipellm` (the policy and its sealer), so dependencies flow one way.
"""

from __future__ import annotations

from veil.cc.device import Device
from veil.pipellm.governor import Phase
from veil.pipellm.options import PipeLLMOptions
from veil.transport.base import Transport, TransportKind, TransportOptions, TransportStats
from veil.transport.pipellm import PipeLLMTransport
from veil.transport.plain import PlainTransport
from veil.transport.sealed import CcTransport, SealedTransport

__all__ = [
    "CcTransport",
    "Phase",
    "PipeLLMTransport",
    "PlainTransport",
    "SealedTransport",
    "Transport",
    "TransportKind",
    "TransportOptions",
    "TransportStats",
    "make_transport",
]


def make_transport(
    kind: TransportKind,
    device: Device,
    options: TransportOptions | None = None,
    pipellm: PipeLLMOptions | None = None,
) -> Transport:
    """Build the transport `kind` for a started `device`; use the result as a context manager.

    Args:
        kind: which transport.
        device: a started device.
        options: settings common to transports (link shape, auto re-key).
        pipellm: settings of the `pipellm` transport; must be None for the others.

    Raises:
        TypeError: if `kind` is not a `TransportKind` (strings are not accepted; use TransportKind(s)).
        ValueError: if `pipellm` options are given for another kind.
        RuntimeError: if the device is not started.
    """
    if not isinstance(kind, TransportKind):
        raise TypeError(f"kind must be a TransportKind, not {type(kind).__name__}")
    if kind is TransportKind.PIPELLM:
        return PipeLLMTransport(device, options, pipellm)
    if pipellm is not None:
        raise ValueError(f"pipellm options apply only to TransportKind.PIPELLM, not {kind}")
    if kind is TransportKind.CC:
        return CcTransport(device, options)
    return PlainTransport(device, options)
