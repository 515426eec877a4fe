"""Plain data the speculator exchanges with its mechanism: its configuration, seal jobs, decisions,
statistics.

Every final decision tells the mechanism exactly what to put on the wire, in counter order:
first one NOP message for each IV in `nop_ivs` (ascending), then one data message at `iv`.
`nop_ivs` always starts at the speculator's next IV and `iv == nop_ivs.stop`, so consecutive decisions
cover the counter 0, 1, 2, ... with no gap and no repeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from veil.pipellm.keys import MiB, SizeClass, SizeClasses, TransferKey


class ReservationState(Enum):
    """Life of one IV reservation in the pipeline."""

    RESERVED = "reserved"  # IV provisionally assigned; nothing sealed; may be reassigned freely
    SEALING = "sealing"  # a seal job was handed out: the IV is bound to this key for good
    SEALED = "sealed"  # the ciphertext is ready, with the source version read before sealing
    DROPPED = "dropped"  # abandoned after its job was handed out: the IV may only be burned by a NOP


@dataclass(frozen=True, slots=True)
class Reservation:
    """A snapshot of one pipeline entry (for inspection; the speculator owns the live state)."""

    job_id: int
    iv: int
    key: TransferKey
    state: ReservationState
    version: int | None  # source write version read before sealing; None until SEALED


@dataclass(frozen=True, slots=True)
class SealJob:
    """Seal `key`'s current bytes under IV `iv`, then report `sealed(job_id, version)`.

    The worker must read the source's write version BEFORE reading its bytes, and must keep the
    ciphertext private (never in shared memory) until a decision commits it. A worker that seals
    nothing (the source is unknown to it or being written, or the reservation was burned meanwhile)
    reports `UNSEALED_VERSION`: if the chunk is requested, the caller seals it at this `iv`
    (`RelinquishReason.UNSEALED`).
    """

    job_id: int
    iv: int
    key: TransferKey


UNSEALED_VERSION = -1  # `sealed(job_id, UNSEALED_VERSION)`: the job sealed nothing (requests carry >= 0)


class RelinquishReason(Enum):
    """Why the pipeline was (partly) given up."""

    MISS = "miss"  # the wanted chunk was not in the pipeline: drop everything, rebuild
    STALE = "stale"  # the pre-sealed chunk's source was written after sealing: never committed
    PAD_LIMIT = "pad-limit"  # the wanted chunk was too far ahead to pad to; a clean IV was nearer
    COLLISION = "collision"  # a synchronous message found live reservations on every nearer IV
    UNSEALED = "unsealed"  # the worker sealed nothing at the wanted chunk's IV: sealed now at that IV


@dataclass(frozen=True, slots=True)
class Commit:
    """Emit the pre-sealed ciphertext of job `job_id` at `iv`. No NOPs are needed."""

    iv: int
    job_id: int
    key: TransferKey
    version: int

    @property
    def nop_ivs(self) -> range:
        return range(self.iv, self.iv)


@dataclass(frozen=True, slots=True)
class PadThenCommit:
    """Emit a NOP at each IV of `nop_ivs`, then the pre-sealed ciphertext of job `job_id` at `iv`.

    `dropped` lists the jobs whose reservations sat on those IVs: discard their ciphertexts.
    """

    nop_ivs: range
    iv: int
    job_id: int
    key: TransferKey
    version: int
    dropped: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Relinquish:
    """Give up reservations, emit a NOP at each IV of `nop_ivs`, then seal `key` now at `iv`.

    `dropped` lists every job this decision abandoned: discard their ciphertexts (or, for jobs still
    running, discard them when `sealed` returns False). Dropped IVs above `iv` stay bound and are
    burned by the NOPs of later decisions; the pipeline is rebuilt after `iv`.
    """

    nop_ivs: range
    iv: int
    key: TransferKey
    version: int
    reason: RelinquishReason
    dropped: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SealNow:
    """Emit a NOP at each IV of `nop_ivs` (already-dropped IVs only), then seal `key` now at `iv`.

    The synchronous path: control and medium traffic, and everything while speculation is off.
    No live reservation is disturbed.
    """

    nop_ivs: range
    iv: int
    key: TransferKey
    version: int
    size_class: SizeClass


@dataclass(frozen=True, slots=True)
class Wait:
    """Not a final decision: the wanted chunk is still being sealed by job `job_id`.

    Nothing was consumed. Wait for that job to report `sealed` or `seal_failed` (without holding the
    lock that serializes speculator calls), then ask `request` again with the same key and version.
    """

    job_id: int
    key: TransferKey


Decision = Commit | PadThenCommit | Relinquish | SealNow


@dataclass(slots=True)
class SpeculatorStats:
    """Counters since the speculator was created (`Speculator.stats` returns a copy)."""

    requests: int = 0  # final decisions returned
    hits: int = 0  # Commit + PadThenCommit
    padded_hits: int = 0  # PadThenCommit
    misses: int = 0  # Relinquish with reason MISS
    stale: int = 0  # Relinquish with reason STALE
    relinquishes: int = 0  # every Relinquish, all reasons
    sync_seals: int = 0  # SealNow
    waits: int = 0  # Wait answers
    nops: int = 0  # NOP messages ordered
    seal_jobs: int = 0  # seal jobs handed out by plan()
    seal_failures: int = 0
    bytes_sealed_ahead: int = 0  # bytes reported sealed by workers
    bytes_committed: int = 0  # bytes sent from a pre-sealed ciphertext
    bytes_sealed_now: int = 0  # bytes sealed on the critical path
    bytes_wasted: int = 0  # bytes sealed ahead and then dropped
    volatile_seals: int = 0  # chunks sealed now, not ahead: their source went stale lately
    pauses: int = 0  # times speculation paused for low prediction confidence
    resumes: int = 0  # times it resumed


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
        chunk_bytes: the message size: a predicted transfer is reserved as its chunks of this size.
        stale_backoff: a source whose pre-sealed chunk went stale (the host wrote it between the
            seal and the request: activations, attention outputs) is sealed on demand, not ahead,
            for its next 1, 2, 4, ... transfers, doubling on every stale retry up to this many and
            halving on every held one; its chunks get clean IVs instead of reservations, so the
            pipeline behind them survives, and a retry is followed by as many clean IVs as it has
            chunks, so a stale retry burns only its own IVs. Once forgiven, a source keeps those
            escape IVs until this many of its chunks in a row held; a source whose version moved
            between two of its transfers gets them before it ever goes stale (in a deep pipeline its
            first stale chunk would otherwise take a clean IV left for another source). 0 never
            backs off (every stale chunk relinquishes).
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
    chunk_bytes: int = MiB
    stale_backoff: int = 64

    def __post_init__(self) -> None:
        if min(self.depth, self.max_pad, self.max_slack, self.min_slack, self.stale_backoff) < 0:
            raise ValueError("depth, max_pad, max_slack, min_slack and stale_backoff must be >= 0")
        if self.min_slack + self.max_slack > self.max_pad:
            raise ValueError(
                f"min_slack + max_slack ({self.min_slack + self.max_slack}) must be <= max_pad "
                f"({self.max_pad}): unused slack is burned by padding"
            )
        if not 0.0 <= self.confidence_off <= self.confidence_on <= 1.0:
            raise ValueError("need 0 <= confidence_off <= confidence_on <= 1")
        if not 0.0 < self.confidence_weight <= 1.0:
            raise ValueError("confidence_weight must be in (0, 1]")
        if self.iv_limit < 1 or self.max_remembered_keys < 1 or self.chunk_bytes < 1:
            raise ValueError("iv_limit, max_remembered_keys and chunk_bytes must be >= 1")
