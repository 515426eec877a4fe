"""The sealer: PipeLLM's mechanism around the pure `Speculator`, for one host-to-device channel.

- One condition variable (`_cond`) serializes every speculator call. The caller releases it while it
  waits for a worker (a `Wait` decision), seals or emits.
- Workers are a standard `ThreadPoolExecutor`. `_feed()` (under `_cond`) takes the speculator's seal
  jobs and submits them as one task per run of consecutive jobs, so thread hand-offs are paid per
  predicted transfer rather than per chunk. A worker reads the source's `stable_version()` BEFORE its
  bytes, seals into the reservation's private staging (`SenderChannel.at(iv)`: the channel is the one
  owner of the counter), copies the finished message into a spare bounce slot if one is free
  (`Reservation.stage`: the copy then costs the worker, not the caller's commit) and reports
  `sealed(job, version)`. A source being written, unknown, or a
  reservation burned or made stale meanwhile is reported with `UNSEALED_VERSION`: nothing is
  committed from it, and a request for its chunk is sealed in the caller at its IV.
- Nothing is lost on failure: a job that cannot be submitted, or whose worker raises, is reported
  (`seal_failed`: the speculator drops every live reservation and turns synchronous for good; the
  error is kept in `error`). A caller told to `Wait` for a job nobody runs reports it unsealed
  instead of waiting forever.
- Checked mode: the worker copies the chunk once into private staging, hashes that copy and seals it
  in place, so the hash and the ciphertext cover the same bytes whatever writes the source meanwhile.
  Before committing, the caller re-hashes the source; on a mismatch it bumps the source's version
  (`mark_written()`), so the stale chunk is relinquished instead of committed.
- The `PhasedGovernor` measures, per phase (prefill, decode) and window of traffic, whether
  speculation pays, and holds the speculator off while the current phase's governor finds sealing in
  the caller faster (`Speculator.hold`).
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from veil.cc.channel import Reservation, SenderChannel
from veil.cc.errors import ReservationError
from veil.cc.host import HostBuffer
from veil.pipellm.decisions import (
    UNSEALED_VERSION,
    Commit,
    Decision,
    PadThenCommit,
    ReservationState,
    SealJob,
    SpeculatorStats,
    Wait,
)
from veil.pipellm.governor import GovernorStats, Mode, Phase, PhasedGovernor
from veil.pipellm.keys import TransferKey, chunk_count
from veil.pipellm.options import PipeLLMOptions
from veil.pipellm.speculator import Speculator

_LIVE = (ReservationState.SEALING, ReservationState.SEALED)


class Start(enum.Enum):
    """How the caller sends a transfer it has announced (`Sealer.begin`)."""

    QUIET = "quiet"  # speculation off, nothing in flight: seal every chunk in the caller, as `cc`
    DECIDE = "decide"  # ask `decide` for each chunk, in order
    REKEY = "rekey"  # the epoch lacks the IVs speculation needs: re-key, then announce again


def seal_chunk(reservation: Reservation, plaintext: memoryview, *, in_place: bool = False) -> None:
    """The default worker seal seam (tests inject failures by passing another)."""
    reservation.seal(plaintext, in_place=in_place)


SealFunction = Callable[..., None]


def chunk_of(source: HostBuffer, key: TransferKey) -> memoryview:
    """The bytes `key` names in `source`."""
    return source.memory()[key.offset : key.offset + key.length]


@dataclasses.dataclass
class SealerCounters:
    """The mechanism's own counters (the speculator counts the rest)."""

    wait_s: float = 0.0
    sync_seal_s: float = 0.0
    check_s: float = 0.0
    check_mismatches: int = 0
    burned_ciphertexts: int = 0


class Sealer:
    """Speculative sealing for one host-to-device sender channel (see module docstring).

    Args:
        sender: the host-to-device sender; its counter must be at 0 of a fresh epoch.
        options: workers, depth, checked mode, predictor, governor.
        prepare_source: called by a worker before it reads a source (forces pending decryptions).
        seal: the seam through which workers seal (tests inject failures here).
    """

    def __init__(
        self,
        sender: SenderChannel,
        options: PipeLLMOptions,
        *,
        prepare_source: Callable[[HostBuffer], None],
        seal: SealFunction = seal_chunk,
    ) -> None:
        self._sender = sender
        self._keep_free = max(1, sender.ring.slot_count // 4)  # bounce slots staging never takes
        self._options = options
        self._prepare_source = prepare_source
        self._seal = seal
        self._predictor = options.predictor()
        self.governor = PhasedGovernor(options.governor)
        self._spec = self._new_speculator(synchronous=False)
        self._pool: ThreadPoolExecutor | None = None
        self._cond = threading.Condition()
        self._running: set[int] = set()  # jobs handed to workers and not reported yet
        self._active_tasks = 0  # worker tasks submitted and not finished
        self._digests: dict[int, object] = {}
        self._sources: weakref.WeakValueDictionary[int, HostBuffer] = weakref.WeakValueDictionary()
        self._earlier = SpeculatorStats()  # counters of the speculators of earlier epochs
        self.counters = SealerCounters()
        self.error: str | None = None

    # lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Sealer:
        if self._pool is not None:
            raise RuntimeError("sealer is already started")
        self._pool = ThreadPoolExecutor(self._options.workers, thread_name_prefix="veil-pipellm-seal")
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
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def new_epoch(self) -> None:
        """Forget the epoch's reservations before the channel is re-keyed (call with transfers idle)."""
        with self._cond:
            synchronous = self._spec.synchronous
            self._spec.disable()
            self._cond.wait_for(lambda: not self._running)
            self._earlier = _add(self._earlier, self._spec.stats)
            self._digests.clear()
            self._spec = self._new_speculator(synchronous=synchronous)

    # inspection --------------------------------------------------------------------------------
    @property
    def synchronous(self) -> bool:
        return self._spec.synchronous

    @property
    def pipeline(self) -> tuple:
        """The speculator's reservations (for inspection and tests)."""
        with self._cond:
            return self._spec.pipeline

    def speculator_stats(self) -> SpeculatorStats:
        """Speculator counters summed over every epoch."""
        with self._cond:
            return _add(self._earlier, self._spec.stats)

    def governor_stats(self) -> GovernorStats:
        """Every phase's governor counters summed (`PhasedGovernor.stats`)."""
        with self._cond:
            return self.governor.stats()

    def governor_stats_by_phase(self) -> dict[Phase, GovernorStats]:
        """Each entered phase's governor statistics."""
        with self._cond:
            return self.governor.stats_by_phase()

    def reach(self) -> int:
        """One past the highest IV the epoch has bound or emitted."""
        with self._cond:
            return self._spec.reach

    # the caller's side -----------------------------------------------------------------------------
    def observe_device_to_host(self, keys: list[TransferKey], destination: HostBuffer) -> None:
        """Report device-to-host chunks (a swap-out predicts its swap-in) and feed the workers."""
        with self._cond:
            self._remember(destination)
            for key in keys:
                self._spec.observe_device_to_host(key)
            self._feed()

    def enter_phase(self, phase: Phase, now: float) -> None:
        """Transfers from `now` on belong to `phase`, whose governor now decides the mode
        (`PhasedGovernor.enter`); speculation is held off or let run at once, as it says."""
        with self._cond:
            self._follow(self.governor.enter(phase, now))

    def hint(self, keys: list[TransferKey], source: HostBuffer) -> None:
        """Pass an engine's hint (these chunks of `source` come next, in order) and feed the workers."""
        with self._cond:
            self._remember(source)
            self._spec.hint(keys)
            self._feed()

    def begin(
        self,
        transfer: TransferKey,
        source: HostBuffer,
        *,
        now: float | None = None,
        margin: int = 0,
    ) -> Start:
        """Announce a host-to-device transfer, in one acquisition of the sealer's lock.

        First the current phase's governor is told the transfer starts at `now` (`Governor.h2d_started`;
        None: not told again, on a retry), and may hold speculation off or let it run. Then, if nothing
        is in flight and speculation is off, every chunk of `transfer` is decided `SealNow` at the next
        consecutive IVs in one O(1) call (the caller has checked that the epoch has IVs for the
        transfer). Otherwise the transfer is announced if the epoch leaves `margin` IVs beyond those
        already spoken for (speculation's reservations and NOPs); if it does not, nothing is announced.

        Returns:
            `Start.QUIET`: seal and emit the chunks in order, exactly as `cc` does.
            `Start.DECIDE`: call `decide` for each chunk, in order.
            `Start.REKEY`: re-key the channel, then call again (with `now=None`).
        """
        with self._cond:
            if now is not None:
                self._follow(self.governor.h2d_started(now, transfer.length))
            spec = self._spec
            if spec.quiet:
                spec.quiet_transfer(transfer)
                return Start.QUIET
            count = chunk_count(transfer.length, self._sender.max_message_bytes)
            if self._sender.lacks_ivs(count, used=spec.reach, margin=margin):
                return Start.REKEY
            self._remember(source)
            spec.begin_transfer(transfer)
            return Start.DECIDE

    def decide(
        self, key: TransferKey, source: HostBuffer, *, before_wait: Callable[[], None] | None = None
    ) -> Decision:
        """The speculator's final decision for `key`, waiting (lock released) for a sealing worker.

        Args:
            before_wait: called (lock released) before each wait for a worker: the caller submits
                the commits it has gathered (`pipellm.submission`).
        """
        while True:
            if self._options.checked:
                self._check(key, source)
            with self._cond:
                spec = self._spec
                if spec.quiet:  # speculation is off and nothing is in flight: the cheap path
                    return spec.request(key, source.version)  # type: ignore[return-value]
                self._remember(source)
                decision = spec.request(key, source.version)
                if not isinstance(decision, Wait):
                    self._settled(decision)
                    self._feed()
                    return decision
                if before_wait is None or decision.job_id not in self._running:
                    self._wait_for(decision.job_id)
                    continue
            before_wait()
            with self._cond:
                self._wait_running(decision.job_id)  # it may have reported meanwhile

    def carry_out(self, decision: Decision, source: HostBuffer) -> None:
        """Emit the decision's NOPs, then its data message (pre-sealed, or sealed now), in order."""
        sender = self._sender
        for iv in decision.nop_ivs:
            burned = sender.at(iv)
            burned.drop()
            self.counters.burned_ciphertexts += burned.carries_data
            sender.emit(burned)
        reservation = sender.at(decision.iv)
        if isinstance(decision, Commit | PadThenCommit):
            assert reservation.carries_data, "commit of a chunk that was not sealed"
        else:
            start = time.perf_counter()
            reservation.seal(chunk_of(source, decision.key))
            self.counters.sync_seal_s += time.perf_counter() - start
        sender.emit(reservation)

    def commit_run(self, decisions: Sequence[Commit]) -> None:
        """Emit pre-sealed chunks committed back to back, in order, as one submission
        (`SenderChannel.emit_run`: the copy engine is woken once)."""
        if not decisions:
            return
        sender = self._sender
        reservations = [sender.at(decision.iv) for decision in decisions]
        assert all(r.carries_data for r in reservations), "commit of a chunk that was not sealed"
        sender.emit_run(reservations)

    # internals ---------------------------------------------------------------------------------
    def _new_speculator(self, *, synchronous: bool) -> Speculator:
        config = self._options.speculator_config(
            iv_limit=self._sender.counter_limit, chunk_bytes=self._sender.max_message_bytes
        )
        spec = Speculator(self._predictor, config)
        if synchronous:
            spec.disable()
        spec.hold(self.governor.mode is Mode.SEAL_IN_CALLER)
        return spec

    def _follow(self, mode: Mode) -> None:
        """Hold speculation off or let it run as the governor says (caller holds `_cond`)."""
        held = mode is Mode.SEAL_IN_CALLER
        if held != self._spec.held:
            self._spec.hold(held)
            self._feed()

    def _remember(self, source: HostBuffer) -> None:
        """Let workers find `source` by id (caller holds `_cond`)."""
        if self._sources.get(source.source_id) is not source:
            self._sources[source.source_id] = source

    def _wait_for(self, job_id: int) -> None:
        """Wait (caller holds `_cond`, released meanwhile) until job `job_id` has reported."""
        if job_id not in self._running:  # nobody will report it: never wait forever
            self._spec.sealed(job_id, UNSEALED_VERSION)
            return
        self._wait_running(job_id)

    def _wait_running(self, job_id: int) -> None:
        """Wait (caller holds `_cond`, released meanwhile) until job `job_id`, handed to a worker,
        is no longer running."""
        start = time.perf_counter()
        self._cond.wait_for(lambda: job_id not in self._running)
        self.counters.wait_s += time.perf_counter() - start

    def _feed(self) -> None:
        """Hand jobs to idle workers as runs of consecutive jobs (caller holds `_cond`)."""
        idle = self._options.workers - self._active_tasks
        if idle <= 0 or self._pool is None:
            return
        jobs = self._spec.plan(self._options.depth)
        for run in _runs(jobs, idle):
            self._running.update(job.job_id for job in run)
            self._active_tasks += 1
            try:
                self._pool.submit(self._seal_run, run)
            except BaseException as exc:  # e.g. shut down meanwhile: report, never leave a job dangling
                self._active_tasks -= 1
                for job in run:
                    self._running.discard(job.job_id)
                    if self._spec.wanted(job.job_id):
                        self._settled_ids(self._spec.seal_failed(job.job_id, f"{type(exc).__name__}: {exc}"))
                    else:
                        self._spec.sealed(job.job_id, UNSEALED_VERSION)
                self.error = self.error or self._spec.error
                self._cond.notify_all()
                return

    def _seal_run(self, run: list[SealJob]) -> None:
        """A worker's task: seal a run of predicted chunks, reporting each as soon as it is done."""
        try:
            for job in run:
                self._seal_one(job)
        finally:
            with self._cond:
                self._active_tasks -= 1
                self._feed()

    def _seal_one(self, job: SealJob) -> None:
        with self._cond:
            if not self._spec.wanted(job.job_id):  # dropped before the worker reached it
                self._running.discard(job.job_id)
                self._spec.sealed(job.job_id, UNSEALED_VERSION)
                self._cond.notify_all()
                return
        try:
            version, digest = self._seal_source(job)
        except BaseException as exc:  # reported: the speculator turns synchronous
            with self._cond:
                self._running.discard(job.job_id)
                self._settled_ids(self._spec.seal_failed(job.job_id, f"{type(exc).__name__}: {exc}"))
                self.error = self.error or self._spec.error
                self._cond.notify_all()
            return
        with self._cond:
            self._running.discard(job.job_id)
            if self._spec.sealed(job.job_id, version) and digest is not None:
                self._digests[job.job_id] = digest
            self._cond.notify_all()

    def _seal_source(self, job: SealJob) -> tuple[int, object]:
        source = self._sources.get(job.key.source_id)
        if source is None:
            return UNSEALED_VERSION, None
        self._prepare_source(source)
        version = source.stable_version()  # BEFORE reading the bytes
        if version is None:
            return UNSEALED_VERSION, None
        try:
            reservation = self._sender.at(job.iv)
        except ReservationError:  # emitted (burned) meanwhile
            return UNSEALED_VERSION, None
        plaintext, digest = chunk_of(source, job.key), None
        if self._options.checked:
            plaintext = reservation.snapshot(plaintext)
            digest = self._options.digest(plaintext)
        try:
            self._seal(reservation, plaintext, in_place=self._options.checked)
        except ReservationError:
            if reservation.sealed or reservation.epoch != self._sender.epoch:
                return UNSEALED_VERSION, None  # burned by the caller, or made stale by a re-key
            raise
        reservation.stage(keep_free=self._keep_free)  # the copy into a slot, off the caller's path
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
        self._settled_ids(getattr(decision, "dropped", ()))

    def _settled_ids(self, job_ids: tuple[int, ...]) -> None:
        for job_id in job_ids:
            self._digests.pop(job_id, None)


def _runs(jobs: list[SealJob], count: int) -> list[list[SealJob]]:
    """Split jobs (nearest IV first) into at most `count` runs of roughly equal length, in order."""
    if not jobs:
        return []
    count = min(count, len(jobs))
    size = -(-len(jobs) // count)
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def _add(a: SpeculatorStats, b: SpeculatorStats) -> SpeculatorStats:
    return SpeculatorStats(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(a)})
