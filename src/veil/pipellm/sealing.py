"""The sealing pipeline: the speculator, its lock, the sealing workers and the IV slots of one epoch.

Mechanism around the pure `Speculator` (docs/pipellm.md, "Driving it"):
- One condition variable (`_cond`) serializes every speculator call. Callers release it while they
  wait for a worker (a `Wait` decision) and while they seal or emit.
- `_feed()` hands the speculator's jobs to idle workers. A worker reads the source's
  `stable_version()` BEFORE its bytes, seals them straight into a bounce slot through the `seal`
  seam (the reservation holds that slot until it is emitted, in counter order), and reports
  `sealed(job, version)`; a source being written (or unknown) is not sealed and is reported with
  `UNSEALED_VERSION`, which no request matches, so it is never committed.
- A worker that raises reports `seal_failed`: the speculator drops every live reservation and turns
  synchronous for good; the error is kept (`error`) and shown in the transport's statistics. The
  transfer in progress carries on: later decisions are synchronous seals.
- Checked mode: a worker hashes the plaintext just before sealing it; before asking the speculator,
  the caller re-hashes the source range of a pre-sealed chunk, and on a mismatch bumps the source's
  version (`mark_written()`), so the speculator relinquishes the stale chunk instead of committing it.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType

from veil.cc.channel import Reservation, SenderChannel
from veil.cc.errors import ReservationError
from veil.cc.host import HostBuffer
from veil.pipellm.decisions import (
    Commit,
    Decision,
    PadThenCommit,
    ReservationState,
    SealJob,
    SpeculatorStats,
    Wait,
)
from veil.pipellm.ivslots import IvSlot, IvSlots
from veil.pipellm.options import PipeLLMOptions
from veil.pipellm.predictor import Predictor
from veil.pipellm.speculator import Speculator
from veil.pipellm.types import TransferKey
from veil.pipellm.workers import WorkerPool

UNSEALED_VERSION = -1  # reported for a job that sealed nothing: requests carry versions >= 0
_LIVE = (ReservationState.SEALING, ReservationState.SEALED)
SealFunction = Callable[[Reservation, memoryview], None]


def seal_into_ring(reservation: Reservation, plaintext: memoryview) -> None:
    """The default `seal` seam: seal straight into a bounce slot, held until the reservation is emitted.

    Safe because the channel seals each reservation exactly once: a pre-sealed chunk that is dropped
    is still emitted as it is (the device authenticates and discards it), never re-sealed as a NOP,
    so at most one ciphertext and tag per IV can ever be seen in shared memory. Sealing in place
    saves the copy from private staging at commit, which here costs as much as the seal itself.
    """
    reservation.seal(plaintext)


def chunk_of(source: HostBuffer, key: TransferKey) -> memoryview:
    """The bytes `key` names in `source`."""
    return source.memory()[key.offset : key.offset + key.length]


@dataclasses.dataclass
class PipelineCounters:
    """The mechanism's own counters (the speculator counts the rest)."""

    wait_s: float = 0.0
    sync_seal_s: float = 0.0
    check_s: float = 0.0
    check_mismatches: int = 0
    burned_ciphertexts: int = 0


class SealPipeline:
    """Speculative sealing for one host-to-device sender channel (see module docstring).

    Args:
        sender: the host-to-device sender; its counter must be at 0 of a fresh epoch.
        options: workers, depth, checked mode, predictor.
        prepare_source: called by a worker before it reads a source (forces pending decryptions).
        seal: the seam through which workers seal (tests inject failures here).
    """

    def __init__(
        self,
        sender: SenderChannel,
        options: PipeLLMOptions,
        *,
        prepare_source: Callable[[HostBuffer], None],
        seal: SealFunction = seal_into_ring,
    ) -> None:
        self._sender = sender
        self._options = options
        self._prepare_source = prepare_source
        self._seal = seal
        self._predictor: Predictor = options.predictor()
        self._spec = self._new_speculator(synchronous=False)
        self._slots = IvSlots(sender)
        self._pool = WorkerPool(options.workers)
        self._cond = threading.Condition()
        self._running: set[int] = set()
        self._digests: dict[int, object] = {}
        self._sources: weakref.WeakValueDictionary[int, HostBuffer] = weakref.WeakValueDictionary()
        self._earlier = SpeculatorStats()  # counters of the speculators of earlier epochs
        self.counters = PipelineCounters()
        self.error: str | None = None

    # lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> SealPipeline:
        self._pool.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop speculating, let running jobs finish, stop the workers (idempotent)."""
        with self._cond:
            self._spec.disable()
            self._cond.wait_for(lambda: not self._running)
        self._pool.close()

    def new_epoch(self) -> None:
        """Forget the epoch's reservations after the channel was re-keyed (call with transfers idle)."""
        with self._cond:
            synchronous = self._spec.synchronous
            self._spec.disable()
            self._cond.wait_for(lambda: not self._running)
            self._earlier = _add(self._earlier, self._spec.stats)
            self._slots.discard_all()
            self._digests.clear()
            self._spec = self._new_speculator(synchronous=synchronous)

    # inspection --------------------------------------------------------------------------------
    @property
    def next_iv(self) -> int:
        return self._spec.next_iv

    @property
    def synchronous(self) -> bool:
        return self._spec.synchronous

    def speculator_stats(self) -> SpeculatorStats:
        """Speculator counters summed over every epoch."""
        with self._cond:
            return _add(self._earlier, self._spec.stats)

    def reach(self) -> int:
        """One past the highest IV the epoch has bound or emitted."""
        with self._cond:
            return self._spec.reach

    # the caller's side -----------------------------------------------------------------------------
    def observe_device_to_host(self, key: TransferKey, destination: HostBuffer) -> None:
        """Report a device-to-host chunk (a swap-out predicts its swap-in) and feed the workers."""
        with self._cond:
            self._sources[destination.source_id] = destination
            self._spec.observe_device_to_host(key)
            self._feed()

    def hint(self, keys: list[TransferKey], source: HostBuffer) -> None:
        """Pass an engine's hint (these chunks of `source` come next, in order) and feed the workers."""
        with self._cond:
            self._sources[source.source_id] = source
            self._spec.hint(keys)
            self._feed()

    def decide(self, key: TransferKey, source: HostBuffer) -> Decision:
        """The speculator's final decision for `key`, waiting (lock released) for a sealing worker."""
        while True:
            if self._options.checked:
                self._check(key, source)
            with self._cond:
                self._sources[source.source_id] = source
                decision = self._spec.request(key, source.version)
                if not isinstance(decision, Wait):
                    self._settled(decision)
                    self._feed()
                    return decision
                self._wait_for(decision.job_id)

    def _wait_for(self, job_id: int) -> None:
        """Wait (caller holds `_cond`, released meanwhile) until job `job_id` has reported."""
        start = time.perf_counter()
        self._cond.wait_for(lambda: job_id not in self._running)
        self.counters.wait_s += time.perf_counter() - start

    def carry_out(self, decision: Decision, source: HostBuffer) -> None:
        """Emit the decision's NOPs, then its data message (pre-sealed, or sealed now), in order."""
        for iv in decision.nop_ivs:
            self.counters.burned_ciphertexts += self._slots.burn(iv)
        if isinstance(decision, Commit | PadThenCommit):
            self._slots.emit_sealed(decision.iv)
            return
        start = time.perf_counter()
        self._slots.seal_and_emit(decision.iv, chunk_of(source, decision.key))
        self.counters.sync_seal_s += time.perf_counter() - start

    # internals ---------------------------------------------------------------------------------
    def _new_speculator(self, *, synchronous: bool) -> Speculator:
        config = self._options.speculator_config(iv_limit=self._sender.counter_limit)
        spec = Speculator(self._predictor, config)
        if synchronous:
            spec.disable()
        return spec

    def _feed(self) -> None:
        """Hand jobs to idle workers (caller holds `_cond`)."""
        idle = self._pool.count - len(self._running)
        if idle <= 0 or not self._pool.running:
            return
        for job in self._spec.plan(idle):
            slot = self._slots.bind(job.iv, job.job_id)
            self._running.add(job.job_id)
            self._pool.submit(functools.partial(self._seal_job, job, slot))

    def _seal_job(self, job: SealJob, slot: IvSlot) -> None:
        """A worker's task: seal one predicted chunk into a bounce slot and report."""
        digest = None
        try:
            version, digest = self._seal_source(job.key, slot)
        except BaseException as exc:  # reported: the pipeline turns synchronous
            slot.done.set()
            with self._cond:
                self._running.discard(job.job_id)
                self._forget(self._spec.seal_failed(job.job_id, f"{type(exc).__name__}: {exc}"))
                self.error = self.error or self._spec.error
                self._cond.notify_all()
            return
        slot.done.set()
        with self._cond:
            self._running.discard(job.job_id)
            if self._spec.sealed(job.job_id, version) and digest is not None:
                self._digests[job.job_id] = digest
            self._feed()
            self._cond.notify_all()

    def _seal_source(self, key: TransferKey, slot: IvSlot) -> tuple[int, object]:
        source = self._sources.get(key.source_id)
        if source is None:
            return UNSEALED_VERSION, None
        self._prepare_source(source)
        version = source.stable_version()  # BEFORE reading the bytes
        if version is None:
            return UNSEALED_VERSION, None
        if slot.reservation.sealed:  # burned by the caller meanwhile
            return UNSEALED_VERSION, None
        plaintext = chunk_of(source, key)
        digest = self._options.digest(plaintext) if self._options.checked else None
        slot.holds_data = True
        try:
            self._seal(slot.reservation, plaintext)
        except ReservationError:
            slot.holds_data = False
            if slot.reservation.sealed:  # burned by the caller before we started: nothing sealed
                return UNSEALED_VERSION, None
            raise
        except BaseException:
            slot.holds_data = slot.reservation.sealed
            raise
        return version, digest

    def _check(self, key: TransferKey, source: HostBuffer) -> None:
        """Checked mode: bump the source's version if a pre-sealed chunk of `key` no longer matches."""
        with self._cond:
            live = next((r for r in self._spec.pipeline if r.key == key and r.state in _LIVE), None)
            digest = None if live is None else self._digests.get(live.job_id)
        if digest is None:
            return
        start = time.perf_counter()
        current = self._options.digest(chunk_of(source, key))
        self.counters.check_s += time.perf_counter() - start
        if current != digest:
            self.counters.check_mismatches += 1
            source.mark_written()

    def _settled(self, decision: Decision) -> None:
        """Forget digests of jobs the decision committed or dropped."""
        if isinstance(decision, Commit | PadThenCommit):
            self._digests.pop(decision.job_id, None)
        self._forget(getattr(decision, "dropped", ()))

    def _forget(self, job_ids: tuple[int, ...]) -> None:
        for job_id in job_ids:
            self._digests.pop(job_id, None)


def _add(a: SpeculatorStats, b: SpeculatorStats) -> SpeculatorStats:
    return SpeculatorStats(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(a)})
