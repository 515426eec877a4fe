"""Build any transport from its `TransportKind`: `plain`, `cc` or `pipellm`.

This is the one place that maps kinds to classes for all three. It lives above `veil.cc` and
`veil.pipellm` so that dependencies flow one way: `veil.cc` never imports `veil.pipellm`.
"""

from __future__ import annotations

from veil.cc.device import Device
from veil.cc.plain import PlainTransport
from veil.cc.sealed import CcTransport
from veil.cc.transport import Transport, TransportKind, TransportOptions
from veil.pipellm.options import PipeLLMOptions
from veil.pipellm.transport import PipeLLMTransport

__all__ = ["make_transport"]


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
