"""Settings and statistics of the `pipellm` transport (mechanism knobs; policy knobs live in config.py)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from veil.pipellm.decisions import SpeculatorConfig, SpeculatorStats
from veil.pipellm.governor import GovernorConfig, GovernorStats
from veil.pipellm.keys import SizeClasses
from veil.pipellm.predictors import default_predictor
from veil.pipellm.predictors.base import Predictor
from veil.pipellm.submission import DEFAULT_SUBMIT_CHUNKS

Digest = Callable[[memoryview], object]


def crc32_digest(data: memoryview) -> int:
    """CRC-32 of `data` (zlib; about 2 GB/s here). Detects accidental writes, not adversarial ones."""
    return zlib.crc32(data)


def default_workers() -> int:
    """Sealing threads for this machine: cores beyond compute and the copy engine, at least one."""
    return max(1, (os.cpu_count() or 1) - 2)


MAX_DECRYPT_THREADS = 64


def default_decrypt_threads() -> int:
    """Decryption lanes for this machine: one on <= 2 cores (compute and the copy engine already
    share them), else one per core beyond those two, at most 4 (the simulator's paper scenario
    shows 4 lanes hide device-to-host opening at H100 scale)."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(4, cores - 2)


@dataclass(frozen=True)
class PipeLLMOptions:
    """Knobs of the `pipellm` transport.

    Attributes:
        workers: sealing threads (each seals one chunk at a time into a bounce slot). Default: one per
            core left after layer compute and the emulated copy engine, at least one.
        depth: live reservations the speculator keeps ahead of the counter. To hide sealing it must
            cover the chunks issued while one unit of work computes (weight streaming: a layer is
            ~14 chunks of 1 MiB for SmolLM2 in fp32). Sealed reservations wait in private staging
            (one message each), never in bounce slots, so any ring size works with any depth.
        max_pad: NOPs worth emitting to reach a pre-sealed chunk (see `SpeculatorConfig.max_pad`).
        sizes: size classes; only host-to-device BULK chunks are speculated.
        async_d2h: decrypt device-to-host traffic in the background (False: in the caller, as `cc`).
        decrypt_threads: background lanes opening device-to-host transfers in parallel (with
            `async_d2h`). Each message keeps the counter it would get sequentially, and destinations
            are written in counter order (docs/pipellm.md). Default: 1 on machines with <= 2 cores,
            else cores - 2, at most 4. At most 64.
        checked: hash each chunk's plaintext when it is sealed ahead and re-hash the source before it
            is committed; a mismatch (a write that bypassed `HostBuffer.write()`/`mark_written()`)
            bumps the source's version, so the stale ciphertext is never committed. Costs one hash of
            every committed chunk on the caller's thread (see docs/pipellm.md for the measured cost).
        digest: the hash of checked mode (CRC-32 by default; pass e.g. a blake2b wrapper for more).
        predictor: builds the predictor (default: hints, cyclic, swap and queue combined).
        speculate: False turns speculation off (every chunk sealed in the caller, as `cc` does).
        stale_backoff: a source whose pre-sealed chunk went stale is sealed on demand for its next
            1, 2, 4, ... transfers, at most this many (`SpeculatorConfig.stale_backoff`; 0: never).
        submit_chunks: pre-sealed chunks committed back to back are handed to the copy engine as one
            submission of at most this many (one wake of the device; `pipellm.submission`); 1:
            each on its own.
        governor: the do-no-harm controller: it measures, per phase (`Transport.enter_phase`) and
            window of traffic, whether speculation or sealing in the caller is faster here, and keeps
            the faster; every phase's governor has this configuration (`GovernorConfig(enabled=
            False)` pins speculation on).
    """

    workers: int = field(default_factory=lambda: default_workers())
    depth: int = 32
    max_pad: int = 16
    sizes: SizeClasses = field(default_factory=SizeClasses)
    async_d2h: bool = True
    decrypt_threads: int = field(default_factory=lambda: default_decrypt_threads())
    checked: bool = False
    digest: Digest = crc32_digest
    predictor: Callable[[], Predictor] = default_predictor
    speculate: bool = True
    stale_backoff: int = 64
    submit_chunks: int = DEFAULT_SUBMIT_CHUNKS
    governor: GovernorConfig = field(default_factory=GovernorConfig)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.depth < 0 or self.max_pad < 0:
            raise ValueError("depth and max_pad must be >= 0")
        if self.submit_chunks < 1:
            raise ValueError(f"submit_chunks must be >= 1, got {self.submit_chunks}")
        threads = self.decrypt_threads
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise TypeError(f"decrypt_threads must be an int, got {type(threads).__name__}")
        if not 1 <= threads <= MAX_DECRYPT_THREADS:
            raise ValueError(f"decrypt_threads must be in [1, {MAX_DECRYPT_THREADS}], got {threads}")

    def speculator_config(self, *, iv_limit: int, chunk_bytes: int) -> SpeculatorConfig:
        """The policy configuration these options imply for a channel of `iv_limit` IVs and
        messages of `chunk_bytes`."""
        slack = min(4, self.max_pad)
        return SpeculatorConfig(
            depth=self.depth,
            max_pad=self.max_pad,
            max_slack=slack,
            sizes=self.sizes,
            speculate=self.speculate,
            stale_backoff=self.stale_backoff,
            iv_limit=iv_limit,
            chunk_bytes=chunk_bytes,
        )


@dataclass(frozen=True)
class PipeLLMStats:
    """What the `pipellm` transport did since it was created (a snapshot).

    Attributes:
        speculator: the policy's counters (hits, misses, NOPs, relinquishes, bytes sealed ahead and
            wasted, ...) summed over every epoch.
        governor: windows measured, mode switches and probes summed over the phases' governors, and
            the latest cost of each mode in the current phase.
        governor_by_phase: each phase's own governor statistics, by `Phase` value ("unlabelled",
            "prefill", "decode"), for the phases entered so far (string keys, so the stats stay JSON).
        wait_s: time callers waited for a worker still sealing the chunk they asked for.
        sync_seal_s: time callers spent sealing chunks themselves (misses and synchronous traffic).
        check_s: time callers spent re-hashing sources in checked mode.
        check_mismatches: chunks whose source changed behind veil's back (checked mode).
        burned_ciphertexts: dropped pre-sealed chunks emitted (and discarded by the device) to burn
            their IV; the channel never seals a second message under a sealed IV (docs/pipellm.md).
        worker_error: the first sealing worker failure (the transport is then synchronous), if any.
        synchronous: True once speculation is off.
        d2h_async: device-to-host transfers decrypted in the background (on the lanes or forced).
        d2h_forced: of those, how many a reader opened itself before a lane took them.
        rekeys: epochs started by this transport.
    """

    speculator: SpeculatorStats
    governor: GovernorStats = field(default_factory=GovernorStats)
    governor_by_phase: dict[str, GovernorStats] = field(default_factory=dict)
    wait_s: float = 0.0
    sync_seal_s: float = 0.0
    check_s: float = 0.0
    check_mismatches: int = 0
    burned_ciphertexts: int = 0
    worker_error: str | None = None
    synchronous: bool = False
    d2h_async: int = 0
    d2h_forced: int = 0
    rekeys: int = 0

    @property
    def hits(self) -> int:
        return self.speculator.hits

    @property
    def misses(self) -> int:
        return self.speculator.misses

    @property
    def nops(self) -> int:
        return self.speculator.nops

    @property
    def relinquishes(self) -> int:
        return self.speculator.relinquishes

    @property
    def bytes_sealed_ahead(self) -> int:
        return self.speculator.bytes_sealed_ahead

    @property
    def bytes_wasted(self) -> int:
        return self.speculator.bytes_wasted
