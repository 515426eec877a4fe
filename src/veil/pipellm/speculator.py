"""The speculator: PipeLLM's pipeline of IV reservations and its decision for every request.

Pure and deterministic: no threads, no clock, no crypto. It holds the sender's view of one
host-to-device message counter as ints. The mechanism (worker threads, transport) drives it:

- `plan(max_jobs)` hands out seal jobs for predicted chunks (each bound to one IV);
- `sealed(job_id, version)` / `seal_failed(job_id, error)` report a job's end;
- `begin_transfer(key)` announces a transfer whose chunks are requested next, in order: the predictor
  learns it once (not once per chunk), and a predicted transfer is reserved as all of its chunks;
  while nothing is in flight, `quiet_transfer(key)` decides all of its chunks in one call;
- `request(key, version)` answers one chunk with one decision (`Commit`, `PadThenCommit`,
  `Relinquish`, `SealNow`), or with `Wait` when the wanted chunk is still being sealed. A chunk
  requested outside an announced transfer is a transfer of its own.

Invariants, by construction (see docs/pipellm.md):
1. The counter moves only through `IVPipeline.emit`, so decisions name IVs 0, 1, 2, ... each once.
2. A data seal is ordered only at a *clean* IV (nothing sealed under it) or at the IV of its own job;
   a reservation's IV is bound from the moment its job is handed out, and a bound IV that is dropped
   is only ever burned by a NOP. No IV seals two different data plaintexts.
3. A pre-sealed chunk is committed only if the version read before sealing equals the caller's
   current version of the source.

A source whose pre-sealed chunk went stale (the host writes it after the worker sealed it and before
the request: activations, attention outputs) is not pre-sealed for its next 1, 2, 4, ... transfers:
its chunks get clean IVs ahead of the reservations behind them and are sealed on demand, so one
stale buffer per step no longer relinquishes the whole pipeline every step (`stale_backoff`). When
it is pre-sealed again, on probation, as many clean IVs as it has chunks are left after it, so a
stale retry burns only its own IVs and is sealed now in the clean ones.

Not thread-safe: the mechanism serializes calls (one lock), and releases it while it waits.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from veil.pipellm._ivpipeline import IVPipeline, Slot
from veil.pipellm.decisions import (
    UNSEALED_VERSION,
    Commit,
    Decision,
    PadThenCommit,
    Relinquish,
    RelinquishReason,
    Reservation,
    ReservationState,
    SealJob,
    SealNow,
    SpeculatorConfig,
    SpeculatorStats,
    Wait,
)
from veil.pipellm.keys import Direction, SizeClass, TransferKey, chunk_count, chunks
from veil.pipellm.predictors import default_predictor
from veil.pipellm.predictors.base import Predictor

_LEARN_BATCH = 64  # queued held transfers learned at once (see `_learn`)
_PROVISIONAL = 64  # provisional reservations `_refill` makes at a time (see there)


@dataclass(slots=True)
class _Backoff:
    """A source sealed on demand after a stale pre-sealed chunk (`SpeculatorConfig.stale_backoff`)."""

    skip: int  # its transfers still to seal on demand; 0: on probation, pre-sealed again
    length: int  # skip granted at the last stale chunk: x2 per stale retry, /2 per held one, 0 forgiven
    calm: int = 0  # chunks held since forgiven (or last written); forgotten at `stale_backoff`


class Speculator:
    """Owns the reservations of one host-to-device channel and decides every request on it.

    Args:
        predictor: what to speculate on (default: hints, cyclic, swap and queue combined).
        config: policy knobs.
    """

    def __init__(self, predictor: Predictor | None = None, config: SpeculatorConfig | None = None) -> None:
        self._predictor = predictor if predictor is not None else default_predictor()
        self._config = config if config is not None else SpeculatorConfig()
        self._pipe = IVPipeline(iv_limit=self._config.iv_limit)
        self._outstanding: dict[int, Slot] = {}  # jobs handed out and not yet reported
        self._next_job_id = 0
        self._stats = SpeculatorStats()
        self._error: str | None = None
        self._synchronous = not self._config.speculate
        self._sync_run = 0  # synchronous messages since the last bulk request
        self._slack: dict[TransferKey, int] = {}  # learned: sync messages seen before this key
        self._unlearned: list[tuple[TransferKey, int]] = []  # held: (transfer, its sync run), in order
        self._confidence = 1.0  # running share of bulk requests the predictor got right
        self._paused = False  # speculation paused for low confidence (resumes by itself)
        self._held = False  # speculation held off by the mechanism's governor (see `hold`)
        self._transfer: TransferKey | None = None  # the announced transfer whose chunks are coming
        self._transfer_class = SizeClass.BULK
        self._transfer_next = 0  # offset of its next chunk
        self._transfer_on_demand = False  # its source was backing off when it began (see `_Backoff`)
        self._backoff: dict[int, _Backoff] = {}  # source id -> stale backoff
        self._versions: dict[int, int] = {}  # source id -> version at its last bulk request (not quiet)

    # -- inspection ---------------------------------------------------------------------------------
    @property
    def config(self) -> SpeculatorConfig:
        return self._config

    @property
    def predictor(self) -> Predictor:
        """The predictor, shown every transfer observed so far."""
        self._catch_up()
        return self._predictor

    @property
    def next_iv(self) -> int:
        """The counter value the next emitted message (NOP or data) will use."""
        return self._pipe.next_iv

    @property
    def synchronous(self) -> bool:
        """True once speculation is off (by config, `disable`, or a seal failure)."""
        return self._synchronous

    @property
    def reach(self) -> int:
        """One past the highest IV bound to a job or emitted: IVs below it are spoken for."""
        return max(self._pipe.next_iv, self._pipe.last_bound_iv() + 1)

    @property
    def quiet(self) -> bool:
        """True when nothing is reserved: every request is decided at the next IV with no NOPs.

        Speculation is off (synchronous, held by the mechanism, or paused for low confidence) and
        the pipeline is empty. The mechanism may then decide a whole transfer's chunks at once
        (`request` stays O(1) per chunk). A paused speculator still scores the predictor's guesses
        and may resume; until the mechanism hands out jobs again, nothing is bound, so its requests
        remain seals at the next IV.
        """
        return (self._synchronous or self._held or self._paused) and self._pipe.empty

    @property
    def paused(self) -> bool:
        """True while speculation is paused because predictions have been poor (see the config)."""
        return self._paused

    @property
    def held(self) -> bool:
        """True while the mechanism holds speculation off (`hold`)."""
        return self._held

    def hold(self, held: bool) -> None:
        """Hold speculation off (True) or let it run again (False).

        While held, nothing new is reserved; reservations already live are still committed as their
        requests arrive, and once they are gone every request is sealed in the caller. The predictor
        keeps learning, so letting go resumes at once. The mechanism holds speculation off when it
        measures that speculation costs more than it saves on this machine.
        """
        self._held = held
        self._pipe.strip_reserved()
        if not held:
            self._refill()

    @property
    def confidence(self) -> float:
        """Running share of bulk requests predicted correctly."""
        return self._confidence

    @property
    def error(self) -> str | None:
        """The first seal failure reported, if any."""
        return self._error

    @property
    def stats(self) -> SpeculatorStats:
        return copy.copy(self._stats)

    @property
    def pipeline(self) -> tuple[Reservation, ...]:
        """Every reservation ahead of the counter, by IV."""
        return tuple(s.snapshot() for s in self._pipe.slots)

    # -- the mechanism's side -------------------------------------------------------------------------
    def plan(self, max_jobs: int) -> list[SealJob]:
        """Hand out up to `max_jobs` seal jobs, nearest IV first (call when workers are idle)."""
        if max_jobs < 0:
            raise ValueError(f"max_jobs must be >= 0, got {max_jobs}")
        jobs: list[SealJob] = []
        reserved = self._pipe.reserved()
        if len(reserved) < max_jobs:  # `_refill` makes a few at a time: make the rest now
            self._pipe.strip_reserved()
            self._refill(max_jobs)
            reserved = self._pipe.reserved()
        for slot in reserved[:max_jobs]:
            slot.state = ReservationState.SEALING
            self._outstanding[slot.job_id] = slot
            jobs.append(SealJob(slot.job_id, slot.iv, slot.key))
        self._stats.seal_jobs += len(jobs)
        return jobs

    def wanted(self, job_id: int) -> bool:
        """True if job `job_id` is handed out and its reservation is still live (worth sealing)."""
        slot = self._outstanding.get(job_id)
        return slot is not None and slot.state is ReservationState.SEALING

    def sealed(self, job_id: int, version: int) -> bool:
        """Job `job_id` sealed its chunk, whose source had write `version` before it was read.

        Returns:
            True to keep the ciphertext for a later commit; False to discard it now (the reservation
            was dropped meanwhile: it must never be emitted).

        Raises:
            ValueError: unknown job, or a job already reported.
        """
        slot = self._pop_outstanding(job_id)
        if version == UNSEALED_VERSION:
            if slot.state is ReservationState.SEALING:
                slot.state, slot.version = ReservationState.SEALED, version
            return False  # nothing to keep: a request for the chunk is sealed at its IV
        self._stats.bytes_sealed_ahead += slot.key.length
        if slot.state is ReservationState.SEALING:
            slot.state, slot.version = ReservationState.SEALED, version
            return True
        self._stats.bytes_wasted += slot.key.length
        return False

    def seal_failed(self, job_id: int, error: str) -> tuple[int, ...]:
        """Job `job_id` failed; its output, if any, must never be emitted.

        Records the first error. With `sync_on_failure` (default) speculation stops for good.

        Returns:
            The jobs dropped because of the failure (this one included): discard their ciphertexts.
        """
        slot = self._pop_outstanding(job_id)
        self._stats.seal_failures += 1
        if self._error is None:
            self._error = error
        slot.state = ReservationState.DROPPED
        dropped = [slot]
        if self._config.sync_on_failure:
            dropped += self._go_synchronous()
        return tuple(s.job_id for s in dropped)

    def disable(self) -> tuple[int, ...]:
        """Stop speculating; returns the dropped jobs (discard their ciphertexts)."""
        return tuple(s.job_id for s in self._go_synchronous())

    # -- the engine's side ------------------------------------------------------------------------------
    def request(self, key: TransferKey, version: int) -> Decision | Wait:
        """Decide how to send `key`, whose source currently has write `version`.

        Returns:
            One final decision (carry it out completely, in order), or `Wait` (nothing consumed).

        Raises:
            ValueError: a device-to-host key, or a negative version.
            RekeyRequired: the counter cannot serve this request; re-key the channel.
        """
        if key.direction is not Direction.H2D:
            raise ValueError("request() takes host-to-device keys; report others with observe_device_to_host")
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        announced = self._announced(key)
        if self.quiet:
            return self._quiet(key, version, announced)
        self._pipe.strip_reserved()
        size_class = self._transfer_class if announced else self._config.sizes.classify(key.length)
        drained = (self._paused or self._held) and not self._pipe.live()
        if size_class is SizeClass.BULK:
            self._note_version(key.source_id, version)  # paused too: learn what the host writes
        if size_class is not SizeClass.BULK or self._synchronous or drained:
            decision = self._sync(key, version, size_class)
        elif key.source_id in self._backoff and (
            (announced and self._transfer_on_demand) or self._pipe.find_live(key) is None
        ):
            decision = self._sync(key, version, size_class)  # backing off: a clean IV was left for it
            self._stats.volatile_seals += 1
        else:
            decision = self._speculative(key, version)
        if isinstance(decision, Wait):
            self._stats.waits += 1
        else:
            if announced:
                self._transfer_next = key.offset + key.length
            self._account(decision, size_class, announced)
        self._refill()
        return decision

    def begin_transfer(self, key: TransferKey) -> None:
        """Announce a host-to-device transfer: its chunks (`chunks(key, chunk_bytes)`) come next, in order.

        The predictor learns the transfer here, once; the chunks' requests then only decide. A request
        for anything else ends the announcement (that chunk is a transfer of its own).

        Raises:
            ValueError: a device-to-host key.
        """
        if key.direction is not Direction.H2D:
            raise ValueError("begin_transfer() takes host-to-device keys")
        size_class = self._config.sizes.classify(key.length)
        self._transfer, self._transfer_class, self._transfer_next = key, size_class, key.offset
        backoff = self._backoff.get(key.source_id)
        self._transfer_on_demand = backoff is not None and backoff.skip > 0
        if size_class is SizeClass.BULK:
            self._learn(key)

    def quiet_transfer(self, key: TransferKey) -> range:
        """Decide a whole host-to-device transfer while `quiet`, in O(1): every chunk is sealed now.

        Returns:
            The IVs of its chunks, in order (the next consecutive ones; no NOPs).

        Raises:
            ValueError: if the speculator is not `quiet` (decide chunk by chunk then), or a
                device-to-host key.
            RekeyRequired: the counter cannot serve the whole transfer; re-key the channel.
        """
        if not self.quiet:
            raise ValueError("quiet_transfer() needs a quiet speculator (nothing in flight, speculation off)")
        count = chunk_count(key.length, self._config.chunk_bytes)
        first = self._pipe.next_iv
        self._pipe.check_limit(first + count - 1)
        self.begin_transfer(key)
        self._pipe.next_iv = first + count
        self._transfer_next = key.offset + key.length
        s = self._stats
        s.requests += count
        s.sync_seals += count
        s.bytes_sealed_now += key.length
        if self._transfer_class is not SizeClass.BULK:
            self._sync_run += count
        return range(first, first + count)

    def observe_device_to_host(self, key: TransferKey) -> None:
        """Report a device-to-host transfer (a swap-out predicts a later swap-in)."""
        if key.direction is not Direction.D2H:
            raise ValueError("observe_device_to_host() takes device-to-host keys")
        if self._config.sizes.classify(key.length) is SizeClass.BULK:
            self._catch_up()
            self._predictor.observe(key)
            self._pipe.strip_reserved()
            self._refill()

    def hint(self, keys: Sequence[TransferKey]) -> None:
        """Explicit upcoming host-to-device transfers, in order (optional)."""
        self._catch_up()
        self._predictor.hint(keys)
        self._pipe.strip_reserved()
        self._refill()

    # -- decisions -----------------------------------------------------------------------------------------
    def _quiet(self, key: TransferKey, version: int, announced: bool) -> SealNow:
        """`request` when `quiet`: the next IV, no NOPs; the predictor keeps learning."""
        size_class = self._transfer_class if announced else self._config.sizes.classify(key.length)
        iv = self._pipe.advance()
        s = self._stats
        s.requests += 1
        s.sync_seals += 1
        s.bytes_sealed_now += key.length
        if announced:
            self._transfer_next = key.offset + key.length
        if size_class is not SizeClass.BULK:
            self._sync_run += 1
        elif not announced:
            self._learn(key)
        return SealNow(range(iv, iv), iv, key, version, size_class)

    def _speculative(self, key: TransferKey, version: int) -> Decision | Wait:
        slot = self._pipe.find_live(key)
        if slot is None:
            return self._relinquish(key, version, RelinquishReason.MISS, self._pipe.drop_live())
        if slot.state is ReservationState.SEALED and slot.version == UNSEALED_VERSION:
            return self._unsealed(slot, key, version)
        if slot.state is ReservationState.SEALED and slot.version != version:
            slot.state = ReservationState.DROPPED
            return self._relinquish(
                key, version, RelinquishReason.STALE, [slot, *self._went_stale(key.source_id)]
            )
        distance = slot.iv - self._pipe.next_iv
        if distance > self._config.max_pad and self._pipe.first_clean_iv() < slot.iv:
            slot.state = ReservationState.DROPPED  # only its own: the ones behind it stay live
            return self._relinquish(key, version, RelinquishReason.PAD_LIMIT, [slot])
        if slot.state is ReservationState.SEALING:
            return Wait(slot.job_id, key)
        assert slot.version is not None
        nop_ivs, dropped = self._pipe.emit(slot.iv)
        self._discard(dropped)
        if not nop_ivs:
            return Commit(slot.iv, slot.job_id, key, slot.version)
        return PadThenCommit(nop_ivs, slot.iv, slot.job_id, key, slot.version, self._ids(dropped))

    def _unsealed(self, slot: Slot, key: TransferKey, version: int) -> Relinquish:
        """`key`'s worker sealed nothing (its source was unknown to it or being written): no
        ciphertext exists under its IV, so `key` is sealed now at that IV, placed as its commit
        would have been (or, past the pad limit, at a nearer clean IV); the reservations behind it
        stay live and its source does not back off, since nothing was written after sealing."""
        slot.state = ReservationState.DROPPED
        if slot.iv - self._pipe.next_iv > self._config.max_pad and self._pipe.first_clean_iv() < slot.iv:
            return self._relinquish(key, version, RelinquishReason.PAD_LIMIT, [])
        nop_ivs, dropped = self._pipe.emit(slot.iv)
        self._discard(dropped)
        return Relinquish(nop_ivs, slot.iv, key, version, RelinquishReason.UNSEALED, self._ids(dropped))

    def _relinquish(
        self, key: TransferKey, version: int, reason: RelinquishReason, dropped: list[Slot]
    ) -> Relinquish:
        self._discard(dropped)
        nop_ivs, burned = self._pipe.emit(self._pipe.first_clean_iv())
        self._discard(burned)
        return Relinquish(nop_ivs, nop_ivs.stop, key, version, reason, self._ids(dropped + burned))

    def _sync(self, key: TransferKey, version: int, size_class: SizeClass) -> Decision:
        nop_ivs, burned = self._pipe.emit(self._pipe.first_clean_iv())
        if burned:
            self._discard(burned)
            return Relinquish(
                nop_ivs, nop_ivs.stop, key, version, RelinquishReason.COLLISION, self._ids(burned)
            )
        return SealNow(nop_ivs, nop_ivs.stop, key, version, size_class)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _announced(self, key: TransferKey) -> bool:
        """True if `key` is the next chunk of the announced transfer (else the announcement ends)."""
        transfer = self._transfer
        if transfer is None:
            return False
        if (
            key.source_id == transfer.source_id
            and key.offset == self._transfer_next
            and key.offset + key.length <= transfer.offset + transfer.length
            and (key.length > 0 or transfer.length == 0)
        ):
            return True
        self._transfer = None
        return False

    def _learn(self, key: TransferKey) -> None:
        """A bulk transfer starts: learn its slack, score the paused guess, show it to the predictor.

        While speculation is held (and not paused, so no guess is scored), nothing consults the
        predictor or the slacks: transfers are queued, with their sync runs, and learned in order in
        batches (`_catch_up`) before either is next consulted, with the same result as one by one. A
        held transfer then costs an append, not four predictors' bookkeeping on a cache that sealing
        megabytes has just emptied.
        """
        run, self._sync_run = self._sync_run, 0
        backoff = self._backoff.get(key.source_id)
        if backoff is not None and backoff.skip:
            backoff.skip -= 1
        if self._held and not self._paused:
            self._unlearned.append((key, run))
            if len(self._unlearned) >= _LEARN_BATCH:
                self._catch_up()
            return
        self._catch_up()
        self._learn_now(key, run)

    def _learn_now(self, key: TransferKey, run: int) -> None:
        self._learn_slack(key, run)
        if self._paused and not self._synchronous:
            guess = self._predictor.peek()  # scored before the predictor sees the key
            if guess is not None:
                self._update_confidence(guess == key)
        self._predictor.observe(key)

    def _catch_up(self) -> None:
        """Learn the queued transfers, in order (before the predictor or the slacks are consulted)."""
        if self._unlearned:
            queued, self._unlearned = self._unlearned, []
            for key, run in queued:  # not paused when queued, and nothing has paused since
                self._learn_slack(key, run)
                self._predictor.observe(key)

    def _account(self, decision: Decision, size_class: SizeClass, announced: bool) -> None:
        s = self._stats
        s.requests += 1
        s.nops += len(decision.nop_ivs)
        if isinstance(decision, Commit | PadThenCommit):
            if self._backoff:
                self._retry_held(decision.key.source_id)
            s.hits += 1
            s.padded_hits += isinstance(decision, PadThenCommit)
            s.bytes_committed += decision.key.length
        else:
            s.bytes_sealed_now += decision.key.length
            if isinstance(decision, Relinquish):
                s.relinquishes += 1
                s.misses += decision.reason is RelinquishReason.MISS
                s.stale += decision.reason is RelinquishReason.STALE
            else:
                s.sync_seals += 1
        if size_class is not SizeClass.BULK:
            self._sync_run += 1
            return
        if not self._paused:
            self._track_confidence(decision)
        if not announced:
            self._learn(decision.key)

    def _track_confidence(self, decision: Decision) -> None:
        """Score one speculated chunk's decision (while paused, `_learn` scores guesses instead).

        A hit is a commit of a pre-sealed chunk that burned no other pre-sealed chunk on the way
        (every burned one crosses the bus for nothing); a miss is a relinquish of a key that was not
        in the pipeline (`MISS`) that dropped reservations. The other relinquishes are not scored:
        their keys were predicted right, and what they burn is a matter of placement, not of the
        predictor (a stale chunk: its source backs off, see `_Backoff`; a chunk too far ahead to pad
        to; a chunk sealed on demand with no clean IV before the reservations ahead). Requests for
        which nothing was predicted (a predictor still learning) are not scored: they waste nothing.
        """
        if self._synchronous:
            return
        if isinstance(decision, Commit):
            self._update_confidence(True)
        elif isinstance(decision, PadThenCommit):
            self._update_confidence(not decision.dropped)  # burning pre-sealed chunks is waste
        elif (
            isinstance(decision, Relinquish) and decision.dropped and decision.reason is RelinquishReason.MISS
        ):
            self._update_confidence(False)

    def _update_confidence(self, hit: bool) -> None:
        """Move the running share of correct predictions; pause or resume speculation by it."""
        self._confidence += self._config.confidence_weight * (float(hit) - self._confidence)
        if self._paused and self._confidence >= self._config.confidence_on:
            self._paused = False
            self._stats.resumes += 1
        elif not self._paused and self._confidence < self._config.confidence_off:
            self._paused = True
            self._stats.pauses += 1

    def _went_stale(self, source_id: int) -> list[Slot]:
        """A pre-sealed chunk of `source_id` went stale: seal its next transfers on demand, for twice
        as many as the last time (see `_Backoff`). Returns its other live reservations, now dropped
        (sealed on probation, they would most likely be stale too)."""
        limit = self._config.stale_backoff
        if not limit:
            return []
        transfer = self._transfer
        if transfer is not None and transfer.source_id == source_id:
            self._transfer_on_demand = True  # its other chunks too (else a hit would forgive it)
        last = self._backoff.pop(source_id, None)
        length = 1 if last is None or not last.length else min(2 * last.length, limit)
        self._backoff[source_id] = _Backoff(length, length)
        if len(self._backoff) > self._config.max_remembered_keys:
            del self._backoff[next(iter(self._backoff))]
        doomed = [s for s in self._pipe.live() if s.key.source_id == source_id]
        for slot in doomed:
            slot.state = ReservationState.DROPPED
        return doomed

    def _note_version(self, source_id: int, version: int) -> None:
        """A source whose version moved since its last request is written between its transfers:
        remember it as forgiven (`_Backoff(0, 0)`), so its reservations get escape IVs before any of
        them goes stale; one remembered already is not forgotten while it is still written. In a
        deep pipeline every reservation may be sealed long before its request; without an escape
        IV the first stale chunk of such a source would take the nearest clean IV, one left for
        another source, and that source's chunk, sealed on demand, would then burn every
        reservation up to the next clean IV."""
        last = self._versions.pop(source_id, None)
        self._versions[source_id] = version
        if len(self._versions) > self._config.max_remembered_keys:
            del self._versions[next(iter(self._versions))]
        if last is None or last == version or not self._config.stale_backoff:
            return
        backoff = self._backoff.get(source_id)
        if backoff is not None:
            backoff.calm = 0  # still written: not forgotten
            return
        self._backoff[source_id] = _Backoff(0, 0)
        if len(self._backoff) > self._config.max_remembered_keys:
            del self._backoff[next(iter(self._backoff))]

    def _retry_held(self, source_id: int) -> None:
        """A chunk of `source_id` pre-sealed on probation was committed: halve its backoff. Once
        nothing is left it is forgiven but remembered: its chunks keep their escape IVs (a reservation
        made before it goes stale again has a clean IV after it, so the chunk sealed on demand then
        burns no reservation behind it) until `stale_backoff` chunks in a row held."""
        backoff = self._backoff.get(source_id)
        if backoff is None or backoff.skip:
            return
        if backoff.length:
            backoff.length //= 2
            return
        backoff.calm += 1
        if backoff.calm >= self._config.stale_backoff:
            del self._backoff[source_id]

    def _learn_slack(self, key: TransferKey, run: int) -> None:
        self._slack.pop(key, None)
        self._slack[key] = min(run, self._config.max_slack)
        if len(self._slack) > self._config.max_remembered_keys:
            del self._slack[next(iter(self._slack))]

    def _refill(self, count: int = 0) -> None:
        """Top the pipeline up to `depth` with provisional reservations for the predicted keys, at
        most `max(count, _PROVISIONAL)` of them (`plan` tops them up again): provisional ones are
        made again on every request, so only what workers can take next is made."""
        if self._synchronous or self._paused or self._held:
            return
        self._catch_up()
        live = len(self._pipe.live())
        depth = self._config.depth
        if live >= depth:
            return
        want = max(count, _PROVISIONAL)
        junction, wanted = self._wanted(depth, live, want)
        # Extend where the pipeline's tail is where the predictor would be: checking that one junction
        # (not the whole window) keeps a request O(1) in Python for the common case. A source whose
        # backoff changed since the tail was reserved moves the positions after it by its chunks:
        # then extend after the tail's nearest position, or, if the tail is not expected at all, not
        # (a disagreement further in is settled by the request that meets it).
        tail = self._pipe.live_tail_key()
        if live and junction != tail:
            assert tail is not None
            at = self._position(tail, depth, live - 1)
            if at is None:
                return
            _, wanted = self._wanted(at + 1 + depth - live, at + 1, want)
        iv = self._pipe.last_bound_iv()
        for key, slack in wanted:
            iv += 1 + self._config.min_slack + slack
            if not self._pipe.within_limit(iv):
                return
            self._pipe.add_reserved(Slot(self._next_job_id, iv, key, ReservationState.RESERVED))
            self._next_job_id += 1

    def _wanted(
        self, depth: int, start: int, count: int
    ) -> tuple[TransferKey | None, list[tuple[TransferKey, int]]]:
        """The chunks expected at positions `start .. start + count - 1` of the next `depth` (`_placed`),
        each with the clean IVs to leave before it, and the key at position `start - 1` (None if there
        is none). Positions before `start - 1` are counted, not built.
        """
        out: list[tuple[TransferKey, int]] = []
        junction: TransferKey | None = None
        stop = min(depth, start + count)
        index, step = 0, self._config.chunk_bytes  # position of the next chunk
        for transfer, slack in self._placed(depth):
            if index >= stop:
                break
            keys = chunks(transfer, step, depth - index)
            if start and index < start <= index + len(keys):
                junction = keys[start - 1 - index]
            first = max(start - index, 0)
            picked = keys[first : stop - index]
            out.extend((key, 0 if i else slack) for i, key in enumerate(picked, first))  # slack: first only
            index += len(keys)
        return junction, out

    def _position(self, key: TransferKey, depth: int, near: int) -> int | None:
        """The position of chunk `key` in the expected sequence (`_placed`) nearest to `near`, looking
        no further than `near + depth`; None if it is not there."""
        best: int | None = None
        index, step = 0, self._config.chunk_bytes
        for transfer, _ in self._placed(near + depth):
            if index > near + depth or (best is not None and index - near > abs(best - near)):
                break  # every later position is further from `near`
            delta = key.offset - transfer.offset
            if (
                key.source_id == transfer.source_id
                and key.direction is transfer.direction
                and 0 <= delta < max(transfer.length, 1)
                and delta % step == 0
                and key.length == min(step, transfer.length - delta)
            ):
                at = index + delta // step
                if best is None or abs(at - near) < abs(best - near):
                    best = at
            index += chunk_count(transfer.length, step)
        return best

    def _placed(self, depth: int) -> Iterator[tuple[TransferKey, int]]:
        """The transfers expected next, in order, each with the clean IVs to leave before its first
        chunk: first the rest of the announced transfer, then the predicted transfers (only
        host-to-device bulk ones). A source backing off after a stale chunk is not placed: its chunks
        become slack before the next transfer, as far as padding would burn them (`max_pad`); beyond
        that nothing more is placed yet.
        """
        transfer, step = self._transfer, self._config.chunk_bytes
        owed = 0  # clean IVs owed to chunks sealed on demand before the next reservation
        if transfer is not None and self._transfer_class is SizeClass.BULK:
            end = transfer.offset + transfer.length
            rest = TransferKey(transfer.source_id, self._transfer_next, end - self._transfer_next)
            if rest.length and self._transfer_on_demand:
                owed = chunk_count(rest.length, step)
            elif rest.length:
                yield rest, 0
                if transfer.source_id in self._backoff:  # on probation: escape IVs after it
                    owed = chunk_count(rest.length, step)
        bulk_above, h2d = self._config.sizes.bulk_above, Direction.H2D
        most_owed = self._config.max_pad - self._config.min_slack
        backoff = self._backoff
        for key in self._predictor.predict(depth):
            # Inline form of `SizeClasses.speculative` (this loop runs on every request).
            if key.length <= bulk_above or key.direction is not h2d:
                continue
            slack = self._slack.get(key, 0) + owed
            if slack > most_owed:
                return
            owed = 0
            if backoff and (b := backoff.get(key.source_id)) is not None:
                if b.skip:
                    owed = slack + chunk_count(key.length, step)
                    continue
                # On probation: as many clean IVs after it as it has chunks, so that if it is stale
                # again only its own IVs are burned and its chunks are sealed now in the clean ones.
                owed = chunk_count(key.length, step)
            yield key, slack

    def _go_synchronous(self) -> list[Slot]:
        self._catch_up()  # the predictor outlives this speculator (a re-key's successor shares it)
        self._synchronous = True
        self._pipe.strip_reserved()
        dropped = self._pipe.drop_live()
        self._discard(dropped)
        return dropped

    def _discard(self, dropped: list[Slot]) -> None:
        for slot in dropped:
            if slot.job_id not in self._outstanding:  # sealed already: its bytes are wasted now
                self._stats.bytes_wasted += slot.key.length

    def _pop_outstanding(self, job_id: int) -> Slot:
        slot = self._outstanding.pop(job_id, None)
        if slot is None:
            raise ValueError(f"job {job_id} is unknown or was already reported")
        return slot

    @staticmethod
    def _ids(slots: list[Slot]) -> tuple[int, ...]:
        return tuple(s.job_id for s in slots)
