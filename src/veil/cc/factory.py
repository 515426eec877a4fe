"""Build a transport from its `TransportKind` (the only place that maps kinds to classes)."""

from __future__ import annotations

from veil.cc.device import Device
from veil.cc.plain import PlainTransport
from veil.cc.sealed import CcTransport
from veil.cc.transport import Transport, TransportKind, TransportOptions

_TRANSPORTS: dict[TransportKind, type[Transport]] = {
    TransportKind.PLAIN: PlainTransport,
    TransportKind.CC: CcTransport,
}


def make_transport(kind: TransportKind, device: Device, options: TransportOptions | None = None) -> Transport:
    """Build the transport `kind` for a started `device`.

    Raises:
        TypeError: if `kind` is not a `TransportKind` (strings are not accepted; use TransportKind(s)).
        RuntimeError: if the device is not started.
    """
    if not isinstance(kind, TransportKind):
        raise TypeError(f"kind must be a TransportKind, not {type(kind).__name__}")
    return _TRANSPORTS[kind](device, options)
