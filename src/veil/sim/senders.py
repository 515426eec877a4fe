"""How each mode puts one chunk on the PCIe link, on a virtual clock (seconds as floats).

A sender owns the host thread that issues transfers (its clock only moves forward) and shares one
`Wire`, the link, which carries messages one at a time in the order they are emitted: IV order. The
GPU's copy engine is assumed to authenticate and decrypt at line rate, so it adds no time.

- `SyncSender(seal=False)` is `plain`: a message costs the host its fixed cost, then the link.
- `SyncSender(seal=True)` is `cc`: the host also seals each chunk right before sending it.
- `PipeLLMSender` asks the real `Speculator` for every chunk; `VirtualWorkers` seal its planned jobs
  in the background, on `spare_cores` modelled cores. Chunks committed pre-sealed back to back go
  to the link as one submission (one `message_s`, then `commit_s` per further chunk), by the
  runtime's rule (`pipellm.submission`).

Device-to-host chunks (`receive`) cross their own `Wire` (the same one when the hardware is not
duplex); the device seals them (free on an H100, at `device_crypto_bytes_per_s` otherwise) and the
host opens them: `plain` does nothing, `cc` opens on the host thread, `pipellm` on background
decryption lanes (as the runtime's `PipeLLMOptions.decrypt_threads`, though here each chunk goes
to the lane free first, where the runtime's lanes take whole transfers): host compute that needs
the chunk, and an h2d of the same buffer, wait for its decryption.

PipeLLM's `Governor` (the runtime's, unchanged) is told each h2d's bytes and the virtual time until
the next one, as the runtime's transport tells it the wall time; while it says to seal in the caller
the speculator is held (`Speculator.hold`), exactly as the runtime's sealer holds it.

With `HostCores` (the emulated device, whose every lane is a host thread), each lane's busy period
(the host's message costs, seals, opens; the copy engine's work; each worker's seal; the decryption
lane) is placed on the shared cores as its kind of work (`Lane`: compute, seal, open, copy) and lasts
longer while other lanes are busy (`cores.py`).
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from veil.pipellm import Decision, PadThenCommit, Speculator, TransferKey, Wait
from veil.pipellm.governor import GovernorStats, Phase, PhasedGovernor
from veil.pipellm.governor import Mode as GovernorMode
from veil.pipellm.submission import DEFAULT_SUBMIT_CHUNKS, Submission
from veil.sim.cores import HostCores, Lane
from veil.sim.hardware import HardwareProfile

NOP_BYTES = 1  # the prototype burns an IV with a 1-byte copy


class Wire:
    """A link: FIFO, one message at a time.

    Args:
        bytes_per_s: link bandwidth.
        record_ivs: keep every emitted IV (data and NOP) in `ivs`, in emission order.
        crypto_bytes_per_s: the receiving (h2d) or sending (d2h) device side's AES-GCM rate when it
            is not free (the emulated copy engine); it adds to each sealed message's time.
        cores: the host cores the link's work runs on (the emulated copy engine is a host thread);
            None: the link is hardware.
    """

    def __init__(
        self,
        bytes_per_s: float,
        *,
        record_ivs: bool = False,
        crypto_bytes_per_s: float | None = None,
        cores: HostCores | None = None,
    ) -> None:
        self._bytes_per_s = bytes_per_s
        self._crypto_bytes_per_s = crypto_bytes_per_s
        self._cores = cores
        self.free_at = 0.0  # when the last emitted message has fully arrived
        self.ivs: list[int] | None = [] if record_ivs else None

    def emit(self, iv: int, nbytes: int, ready_at: float, *, sealed: bool = True) -> float:
        """Send a message that is ready at `ready_at`; returns when it has arrived."""
        busy = nbytes / self._bytes_per_s
        crypto = self._crypto_bytes_per_s if sealed else None
        if crypto is not None:
            busy += nbytes / crypto
        start = max(ready_at, self.free_at)
        lane = Lane.COPY if crypto is None else Lane.OPEN  # the emulated copy engine's kind of work
        self.free_at = self._cores.run(start, busy, lane) if self._cores is not None else start + busy
        if self.ivs is not None:
            self.ivs.append(iv)
        return self.free_at


class Sender(ABC):
    """Issues chunk transfers in program order on one host thread.

    Args:
        wire: the host-to-device link.
        hardware: rates and costs.
        d2h_wire: the device-to-host link (None: a duplex one is made from the profile).
        cores: the host cores every host lane shares (None: each lane has its own core).
    """

    def __init__(
        self,
        wire: Wire,
        hardware: HardwareProfile,
        d2h_wire: Wire | None = None,
        cores: HostCores | None = None,
    ) -> None:
        self._wire = wire
        self._hw = hardware
        self._d2h = d2h_wire or Wire(hardware.pcie_d2h_bytes_per_s)
        self.cores = cores
        self._host = 0.0  # when the host thread is next free
        self._d2h_iv = 0

    @property
    def host_free(self) -> float:
        """When the host thread is next free."""
        return self._host

    def occupy_host(self, until: float) -> None:
        """The host thread is busy (computing, waiting) until `until`."""
        self._host = max(self._host, until)

    def work(self, start: float, seconds: float, lane: Lane = Lane.COMPUTE) -> float:
        """When `seconds` of one `lane`'s single-core work started at `start` ends (on the shared
        cores; a message's fixed cost alone is host code, `Lane.COMPUTE`)."""
        return self.cores.run(start, seconds, lane) if self.cores is not None else start + seconds

    def seal_s(self, nbytes: int) -> float:
        """Time one core takes to seal `nbytes`."""
        return nbytes / self._hw.seal_bytes_per_s

    def open_s(self, nbytes: int) -> float:
        """Time one core takes to open `nbytes`."""
        return nbytes / self._hw.open_bytes_per_s

    @abstractmethod
    def send(self, key: TransferKey, not_before: float, version: int = 0) -> float:
        """Issue `key` no earlier than `not_before`; returns when its bytes are on the device.

        `version` is the source buffer's write version at the request (what `Speculator.request`
        validates pre-sealed chunks against).
        """

    def send_transfer(self, keys: list[TransferKey], not_before: float, version: int = 0) -> float:
        """Issue a transfer's chunks (or its one message) in order; returns when all are on the device."""
        return max(self.send(key, not_before, version) for key in keys)

    def receive(self, key: TransferKey, not_before: float) -> float:
        """Issue device-to-host `key` no earlier than `not_before`; returns when its plaintext is in
        host memory (the base: no host-side work, as `plain`)."""
        t = self.work(max(self._host, not_before), self._hw.message_s)
        self._host = t
        return self._emit_d2h(key, t)

    def _emit_d2h(self, key: TransferKey, t: float) -> float:
        iv, self._d2h_iv = self._d2h_iv, self._d2h_iv + 1
        return self._d2h.emit(iv, key.length, t, sealed=self.seals)

    @property
    def seals(self) -> bool:
        """True if messages are sealed (cc, pipellm)."""
        return True


class SyncSender(Sender):
    """`plain` (seal=False) or `cc` (seal=True): the host seals and opens, if at all, on its own path."""

    def __init__(
        self,
        wire: Wire,
        hardware: HardwareProfile,
        *,
        seal: bool,
        d2h_wire: Wire | None = None,
        cores: HostCores | None = None,
    ) -> None:
        super().__init__(wire, hardware, d2h_wire, cores)
        self._seal = seal
        self._next_iv = 0

    @property
    def seals(self) -> bool:
        return self._seal

    def send(self, key: TransferKey, not_before: float, version: int = 0) -> float:
        work = self._hw.message_s + (self.seal_s(key.length) if self._seal else 0.0)
        t = self.work(max(self._host, not_before), work, Lane.SEAL if self._seal else Lane.COMPUTE)
        self._host = t
        iv, self._next_iv = self._next_iv, self._next_iv + 1
        return self._wire.emit(iv, key.length, t, sealed=self._seal)

    def receive(self, key: TransferKey, not_before: float) -> float:
        arrived = super().receive(key, not_before)
        if not self._seal:
            return arrived
        self._host = self.work(max(self._host, arrived), self.open_s(key.length), Lane.OPEN)  # in the caller
        return self._host


class VirtualWorkers:
    """`count` modelled cores sealing the speculator's jobs; fungible, started when planned.

    Call `advance(now)` before each request (it reports every job that ended by `now`, in end-time
    order, and re-plans at each end) and `feed(now)` after it (it plans for idle cores).
    """

    def __init__(
        self, spec: Speculator, count: int, sender: Sender, version_of: Callable[[int], int] | None = None
    ) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._spec = spec
        self._sender = sender
        self._version_of = version_of or (lambda source_id: 0)
        self._versions: dict[int, int] = {}  # job id -> the source version read when it started
        self._idle = count
        self._running: list[tuple[float, int]] = []  # heap of (end time, job id)
        self._ends: dict[int, float] = {}
        self.busy_s = 0.0  # total modelled sealing time, wasted jobs included

    def end_of(self, job_id: int) -> float:
        """When running job `job_id` ends."""
        return self._ends[job_id]

    def advance(self, now: float) -> None:
        while self._running and self._running[0][0] <= now:
            end, job_id = heapq.heappop(self._running)
            del self._ends[job_id]
            # False (dropped meanwhile) needs nothing: no ciphertext kept
            self._spec.sealed(job_id, self._versions.pop(job_id))
            self._idle += 1
            self.feed(end)

    def feed(self, now: float) -> None:
        if self._idle == 0:
            return
        for job in self._spec.plan(self._idle):
            seal_s = self._sender.seal_s(job.key.length)
            self.busy_s += seal_s
            end = self._sender.work(now, seal_s, Lane.SEAL)
            self._ends[job.job_id] = end
            self._versions[job.job_id] = self._version_of(job.key.source_id)
            heapq.heappush(self._running, (end, job.job_id))
            self._idle -= 1


class PipeLLMSender(Sender):
    """Every chunk is decided by `spec`; pre-sealed chunks skip the seal on the host's path.

    Args:
        version_of: a source buffer's current write version (what a worker reads before sealing);
            None: every version is 0 (no host writes, so nothing is ever stale).
        on_decision: called with every final decision, in order (tests compare them).
        governor: the runtime's do-no-harm governor, one per phase, told every h2d's bytes and time and
            every step's phase (`enter_phase`; None: none, speculation always on).
        cores: the host cores every host lane shares (None: each lane has its own core).
        decrypt_threads: background decryption lanes (`PipeLLMOptions.decrypt_threads` in the runtime).
        submit_chunks: pre-sealed chunks per submission (`PipeLLMOptions.submit_chunks`).

    Raises:
        ValueError: if `decrypt_threads` or `submit_chunks` < 1.
    """

    def __init__(
        self,
        wire: Wire,
        hardware: HardwareProfile,
        spec: Speculator,
        *,
        spare_cores: int,
        d2h_wire: Wire | None = None,
        version_of: Callable[[int], int] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
        governor: PhasedGovernor | None = None,
        cores: HostCores | None = None,
        decrypt_threads: int = 1,
        submit_chunks: int = DEFAULT_SUBMIT_CHUNKS,
    ) -> None:
        if decrypt_threads < 1 or submit_chunks < 1:
            raise ValueError(
                f"decrypt_threads and submit_chunks must be >= 1, got {decrypt_threads}, {submit_chunks}"
            )
        super().__init__(wire, hardware, d2h_wire, cores)
        self._submit_chunks = submit_chunks
        self._spec = spec
        self.governor = governor
        self.workers = VirtualWorkers(spec, spare_cores, self, version_of)
        self._on_decision = on_decision
        self._decrypted_at: dict[int, float] = {}  # host buffer -> when its pending d2h is opened
        self._decrypt_lanes = [0.0] * decrypt_threads  # when each background decryption lane is next free
        self._quiet_ivs: Iterator[int] = iter(())  # IVs of a transfer decided at once
        self.wait_s = 0.0  # host time spent waiting for a job already sealing the wanted chunk
        self.waits = 0

    @property
    def speculator(self) -> Speculator:
        return self._spec

    def receive(self, key: TransferKey, not_before: float) -> float:
        arrived = super().receive(key, not_before)
        lanes = self._decrypt_lanes
        lane = lanes.index(min(lanes))
        lanes[lane] = self.work(max(lanes[lane], arrived), self.open_s(key.length), Lane.OPEN)
        self._decrypted_at[key.source_id] = max(self._decrypted_at.get(key.source_id, 0.0), lanes[lane])
        return lanes[lane]  # its plaintext: what the host computes on (an h2d of this buffer waits too)

    def observe_device_to_host(self, transfer: TransferKey) -> None:
        """Report a whole device-to-host transfer (a swap-out predicts its swap-in), as the runtime
        does once its chunks are issued; feeds idle workers."""
        self._spec.observe_device_to_host(transfer)
        self.workers.feed(self._host)

    def hint(self, transfers: list[TransferKey], now: float) -> None:
        """Pass an engine's hint (whole transfers) to the speculator and feed idle workers."""
        self.workers.advance(max(self._host, now))
        self._spec.hint(transfers)
        self.workers.feed(max(self._host, now))

    def begin(self, transfer: TransferKey, not_before: float) -> bool:
        """Announce a host-to-device transfer before its chunks are sent, as the runtime's sealer does.

        Returns:
            True if the speculator was quiet and decided every chunk `SealNow` at once: send them with
            `send_quiet`. False: send each chunk with `send`.
        """
        now = max(self._host, not_before, self._decrypted_at.get(transfer.source_id, 0.0))
        self.workers.advance(now)
        self._govern(transfer.length, now)
        if self._spec.quiet:
            self._quiet_ivs = iter(self._spec.quiet_transfer(transfer))
            return True
        self._spec.begin_transfer(transfer)
        return False

    @property
    def governor_stats(self) -> GovernorStats | None:
        """What the governor measured and did (None without one)."""
        return None if self.governor is None else self.governor.stats()

    @property
    def governor_by_phase(self) -> dict[str, GovernorStats]:
        """Each entered phase's governor statistics, by `Phase` value (empty without a governor)."""
        if self.governor is None:
            return {}
        return {phase.value: stats for phase, stats in self.governor.stats_by_phase().items()}

    def enter_phase(self, phase: Phase, now: float) -> None:
        """The transfers from `now` on belong to `phase`, as the runtime's engine says before each
        step (`Transport.enter_phase`): that phase's governor decides from now on."""
        if self.governor is not None:
            self._follow(self.governor.enter(phase, now), now)

    def _govern(self, nbytes: int, now: float) -> None:
        """Report the previous h2d's bytes and the time until this one, as the runtime's transport
        does on every h2d, and hold the speculator while the governor says to seal in the caller."""
        if self.governor is None:
            return
        self._follow(self.governor.h2d_started(now, nbytes), now)

    def _follow(self, mode: GovernorMode, now: float) -> None:
        """Hold the speculator while the governor says to seal in the caller."""
        held = mode is GovernorMode.SEAL_IN_CALLER
        if held != self._spec.held:
            self._spec.hold(held)
            self.workers.feed(now)

    def send_quiet(self, key: TransferKey, not_before: float) -> float:
        """Seal and send one chunk of a transfer `begin` decided at once (as `cc` does)."""
        start = max(self._host, not_before, self._decrypted_at.get(key.source_id, 0.0))
        t = self.work(start, self._hw.message_s + self.seal_s(key.length), Lane.SEAL)
        self._host = t
        return self._wire.emit(next(self._quiet_ivs), key.length, t)

    def send(self, key: TransferKey, not_before: float, version: int = 0) -> float:
        return self.send_transfer([key], not_before, version)

    def send_transfer(self, keys: list[TransferKey], not_before: float, version: int = 0) -> float:
        """Decide each chunk with the speculator and put its messages on the wire, pre-sealed chunks
        committed back to back in one submission (`Submission`: one `message_s` for the run, and
        `commit_s` for each chunk after the first)."""
        t = max(self._host, not_before, *(self._decrypted_at.get(k.source_id, 0.0) for k in keys))
        submission: Submission[tuple[int, int]] = Submission(self._submit_chunks)  # (iv, length)
        arrived = 0.0

        def submit(t: float) -> float:
            nonlocal arrived
            if len(submission):
                t = self.work(t, self._hw.message_s + (len(submission) - 1) * self._hw.commit_s)
                for iv, length in submission.take():
                    arrived = max(arrived, self._wire.emit(iv, length, t))
            return t

        for key in keys:
            self.workers.advance(t)
            decision = self._spec.request(key, version)
            while isinstance(decision, Wait):
                t = submit(t)  # what is gathered goes before the caller waits
                end = self.workers.end_of(decision.job_id)
                self.waits += 1
                self.wait_s += max(0.0, end - t)
                t = max(t, end)
                self.workers.advance(t)
                decision = self._spec.request(key, version)
            if self._on_decision is not None:
                self._on_decision(decision)
            self.workers.feed(t)
            assert self._spec.next_iv == decision.iv + 1, "the channel counter must follow the speculator"
            if Submission.joins(decision):
                if submission.add((decision.iv, key.length)):
                    t = submit(t)
                continue
            t = submit(t)
            for iv in decision.nop_ivs:
                t = self.work(t, self._hw.message_s)
                self._wire.emit(iv, NOP_BYTES, t)
            work, lane = self._hw.message_s, Lane.COMPUTE
            if not isinstance(decision, PadThenCommit):  # Relinquish | SealNow: seal now
                work, lane = work + self.seal_s(key.length), Lane.SEAL
            t = self.work(t, work, lane)
            arrived = max(arrived, self._wire.emit(decision.iv, key.length, t))
        self._host = submit(t)
        return arrived
