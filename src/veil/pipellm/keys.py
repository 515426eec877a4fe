"""Plain data shared by PipeLLM's predictors and speculator: transfer keys and size classes.

A *transfer* is one copy across the CPU-accelerator boundary: `length` bytes at `offset` of the
host-side buffer `source_id`, in one direction (a layer's weights, a KV block, an adapter). On the wire
it is a run of *chunks* of at most one message each (1 MiB, `chunks`); a chunk is named by a key too.
Predictors learn and name whole transfers (one observation per layer, not per MiB); the speculator
reserves, seals and commits chunks, one IV each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

from veil.cc.session import Direction  # one Direction for the channel and the policy

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class TransferKey:
    """Identity of one transfer or one of its chunks: what a prediction names and validation compares.

    Attributes:
        source_id: host-side buffer the bytes come from (H2D) or go to (D2H).
        offset: byte offset inside that buffer.
        length: number of bytes (a chunk's is at most one message).
        direction: which way the bytes travel.
    """

    source_id: int
    offset: int
    length: int
    direction: Direction = Direction.H2D

    def __post_init__(self) -> None:
        for name in ("source_id", "offset", "length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TransferKey.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.direction, Direction):
            raise TypeError(f"TransferKey.direction must be a Direction, got {self.direction!r}")

    def mirrored(self) -> TransferKey:
        """The same host range travelling the other way (a swap-in mirrors its swap-out)."""
        other = Direction.H2D if self.direction is Direction.D2H else Direction.D2H
        return TransferKey(self.source_id, self.offset, self.length, other)


def chunk_count(length: int, chunk_bytes: int) -> int:
    """How many chunks `chunks` makes of a transfer of `length` bytes (an empty one is one chunk)."""
    return max(1, -(-length // chunk_bytes))


def chunks(key: TransferKey, chunk_bytes: int, limit: int | None = None) -> list[TransferKey]:
    """The messages of transfer `key`: consecutive chunks of at most `chunk_bytes` (one empty chunk if
    the transfer is empty), only the first `limit` if given. The one chunking rule, shared by the
    transport and the speculator."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if key.length <= chunk_bytes:
        return [key] if limit is None or limit > 0 else []
    split = _split(key, chunk_bytes)
    return list(split if limit is None else split[: max(limit, 0)])


@functools.lru_cache(maxsize=4096)
def _split(key: TransferKey, chunk_bytes: int) -> tuple[TransferKey, ...]:
    """Every chunk of a multi-chunk `key`, made once: the speculator asks for the chunks of the same
    predicted transfers on every request, and a deep pipeline holds thousands of them."""
    end = key.offset + key.length
    return tuple(
        TransferKey(key.source_id, start, min(chunk_bytes, end - start), key.direction)
        for start in range(key.offset, end, chunk_bytes)
    )


class SizeClass(Enum):
    """How the policy treats a transfer, decided by its length alone."""

    CONTROL = "control"  # small (kernel arguments, token ids): sealed synchronously, invisible to predictors
    MEDIUM = "medium"  # in between: sealed synchronously, not speculated, invisible to predictors
    BULK = "bulk"  # swap / weight / adapter chunks: observed, predicted and sealed ahead


@dataclass(frozen=True, slots=True)
class SizeClasses:
    """Length thresholds that sort transfers into size classes (the paper: <8 KiB and >128 KiB).

    Attributes:
        control_below: lengths strictly below this are CONTROL.
        bulk_above: lengths strictly above this are BULK; everything else is MEDIUM.
    """

    control_below: int = 8 * KiB
    bulk_above: int = 128 * KiB

    def __post_init__(self) -> None:
        if self.control_below < 0 or self.bulk_above < 0:
            raise ValueError("size thresholds must be >= 0")
        if self.control_below > self.bulk_above + 1:
            raise ValueError(
                f"control_below ({self.control_below}) must be <= bulk_above + 1 ({self.bulk_above + 1})"
            )

    def classify(self, length: int) -> SizeClass:
        """Size class of a transfer of `length` bytes."""
        if length < self.control_below:
            return SizeClass.CONTROL
        if length > self.bulk_above:
            return SizeClass.BULK
        return SizeClass.MEDIUM

    def speculative(self, key: TransferKey) -> bool:
        """True if the speculator may predict and pre-seal `key` (host-to-device bulk traffic)."""
        return key.direction is Direction.H2D and self.classify(key.length) is SizeClass.BULK
