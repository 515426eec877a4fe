"""Configuration of the speculator (policy knobs, no mechanism)."""

from __future__ import annotations

from dataclasses import dataclass, field

from veil.pipellm.types import SizeClasses


@dataclass(frozen=True)
class SpeculatorConfig:
    """Knobs of the speculation policy.

    Attributes:
        depth: live reservations kept ahead (reserved + sealing + sealed).
        max_pad: NOPs worth emitting to reach a pre-sealed chunk; beyond this, relinquish if a clean
            IV is nearer. Roughly (time to seal one chunk) / (time of one NOP message).
        max_slack: most clean IVs left before a reservation for synchronous messages (learned per key).
        min_slack: clean IVs always left before each reservation.
        sizes: thresholds of the size classes.
        speculate: False makes every request a SealNow (the `cc` behaviour).
        sync_on_failure: after a seal failure, stop speculating for good (record the error).
        iv_limit: first counter value that may not be used (2**32 for the 32-bit counter).
        max_remembered_keys: keys whose learned slack is kept (oldest forgotten first).
        confidence_off: speculation pauses when the running share of correctly predicted bulk
            requests falls below this. Every missed pre-sealed chunk is burned (its ciphertext still
            crosses and is discarded by the device), so guessing badly costs more than not guessing.
        confidence_on: paused speculation resumes when the share, still tracked passively from the
            predictor's next guess, is back at or above this (hysteresis: on >= off).
        confidence_weight: weight of the newest request in that running share (an EWMA).
    """

    depth: int = 8
    max_pad: int = 16
    max_slack: int = 4
    min_slack: int = 0
    sizes: SizeClasses = field(default_factory=SizeClasses)
    speculate: bool = True
    sync_on_failure: bool = True
    iv_limit: int = 2**32
    max_remembered_keys: int = 65536
    confidence_off: float = 0.8
    confidence_on: float = 0.97
    confidence_weight: float = 1 / 16

    def __post_init__(self) -> None:
        if min(self.depth, self.max_pad, self.max_slack, self.min_slack) < 0:
            raise ValueError("depth, max_pad, max_slack and min_slack must be >= 0")
        if self.min_slack + self.max_slack > self.max_pad:
            raise ValueError(
                f"min_slack + max_slack ({self.min_slack + self.max_slack}) must be <= max_pad "
                f"({self.max_pad}): unused slack is burned by padding"
            )
        if not 0.0 <= self.confidence_off <= self.confidence_on <= 1.0:
            raise ValueError("need 0 <= confidence_off <= confidence_on <= 1")
        if not 0.0 < self.confidence_weight <= 1.0:
            raise ValueError("confidence_weight must be in (0, 1]")
        if self.iv_limit < 1 or self.max_remembered_keys < 1:
            raise ValueError("iv_limit and max_remembered_keys must be >= 1")
