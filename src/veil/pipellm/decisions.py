"""Plain data the speculator exchanges with its mechanism: seal jobs, decisions, statistics.

Every final decision tells the mechanism exactly what to put on the wire, in counter order:
first one NOP message for each IV in `nop_ivs` (ascending), then one data message at `iv`.
`nop_ivs` always starts at the speculator's next IV and `iv == nop_ivs.stop`, so consecutive decisions
cover the counter 0, 1, 2, ... with no gap and no repeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from veil.pipellm.types import SizeClass, TransferKey


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
    ciphertext private (never in shared memory) until a decision commits it.
    """

    job_id: int
    iv: int
    key: TransferKey


class RelinquishReason(Enum):
    """Why the pipeline was (partly) given up."""

    MISS = "miss"  # the wanted chunk was not in the pipeline: drop everything, rebuild
    STALE = "stale"  # the pre-sealed chunk's source was written after sealing: never committed
    PAD_LIMIT = "pad-limit"  # the wanted chunk was too far ahead to pad to; a clean IV was nearer
    COLLISION = "collision"  # a synchronous message found live reservations on every nearer IV


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
    pauses: int = 0  # times speculation paused for low prediction confidence
    resumes: int = 0  # times it resumed
