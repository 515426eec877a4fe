"""Exceptions of the confidential-computing data path.

`IntegrityError` is the only error an attacker can provoke on purpose. It is deliberately opaque: it
never says which check failed, at which byte, or what was expected. Operators read failure counts from
the channel statistics instead.
"""

from __future__ import annotations

from veil.errors import VeilError


class IntegrityError(VeilError):
    """A sealed message failed to authenticate, or the channel is poisoned by an earlier failure.

    Raised for tampering, replay, reordering, dropping, truncation and wrong keys alike. Nothing was
    written into the destination. The channel refuses every later message until it is re-keyed.
    """

    def __init__(self, message: str = "message authentication failed") -> None:
        super().__init__(message)


class RekeyRequired(VeilError):
    """The channel has used every IV its counter limit allows; it must be re-keyed (never wrapped)."""


class ReservationError(VeilError, RuntimeError):
    """A reservation was misused: sealed twice, emitted out of counter order, or stale after a re-key."""


class DeviceOutOfMemory(VeilError, MemoryError):
    """An allocation would exceed the device arena's capacity."""
