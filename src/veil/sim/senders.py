"""How each mode puts one chunk on the PCIe link, on a virtual clock (seconds as floats).

A sender owns the host thread that issues transfers (its clock only moves forward) and shares one
`Wire`, the link, which carries messages one at a time in the order they are emitted: IV order. The
GPU's copy engine is assumed to authenticate and decrypt at line rate, so it adds no time.

- `SyncSender(seal=False)` is `plain`: a message costs the host its fixed cost, then the link.
- `SyncSender(seal=True)` is `cc`: the host also seals each chunk right before sending it.
- `PipeLLMSender` asks the real `Speculator` for every chunk; `VirtualWorkers` seal its planned jobs
  in the background, on `spare_cores` modelled cores.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod

from veil.pipellm import Commit, PadThenCommit, Speculator, TransferKey, Wait
from veil.sim.hardware import HardwareProfile

NOP_BYTES = 1  # the prototype burns an IV with a 1-byte copy


class Wire:
    """The host-to-device link: FIFO, one message at a time.

    Args:
        bytes_per_s: link bandwidth.
        record_ivs: keep every emitted IV (data and NOP) in `ivs`, in emission order.
    """

    def __init__(self, bytes_per_s: float, *, record_ivs: bool = False) -> None:
        self._bytes_per_s = bytes_per_s
        self.free_at = 0.0  # when the last emitted message has fully arrived
        self.ivs: list[int] | None = [] if record_ivs else None

    def emit(self, iv: int, nbytes: int, ready_at: float) -> float:
        """Send a message that is ready at `ready_at`; returns when it has arrived."""
        self.free_at = max(ready_at, self.free_at) + nbytes / self._bytes_per_s
        if self.ivs is not None:
            self.ivs.append(iv)
        return self.free_at


class Sender(ABC):
    """Issues chunk transfers in program order on one host thread."""

    def __init__(self, wire: Wire, hardware: HardwareProfile) -> None:
        self._wire = wire
        self._hw = hardware
        self._host = 0.0  # when the host thread is next free

    def seal_s(self, nbytes: int) -> float:
        """Time one core takes to seal `nbytes`."""
        return nbytes / self._hw.seal_bytes_per_s

    @abstractmethod
    def send(self, key: TransferKey, not_before: float) -> float:
        """Issue `key` no earlier than `not_before`; returns when its bytes are on the device."""


class SyncSender(Sender):
    """`plain` (seal=False) or `cc` (seal=True): the host seals, if at all, on its own path."""

    def __init__(self, wire: Wire, hardware: HardwareProfile, *, seal: bool) -> None:
        super().__init__(wire, hardware)
        self._seal = seal
        self._next_iv = 0

    def send(self, key: TransferKey, not_before: float) -> float:
        t = max(self._host, not_before) + self._hw.message_s
        if self._seal:
            t += self.seal_s(key.length)
        self._host = t
        iv, self._next_iv = self._next_iv, self._next_iv + 1
        return self._wire.emit(iv, key.length, t)


class VirtualWorkers:
    """`count` modelled cores sealing the speculator's jobs; fungible, started when planned.

    Call `advance(now)` before each request (it reports every job that ended by `now`, in end-time
    order, and re-plans at each end) and `feed(now)` after it (it plans for idle cores).
    """

    def __init__(self, spec: Speculator, count: int, sender: Sender) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._spec = spec
        self._sender = sender
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
            self._spec.sealed(job_id, 0)  # False (dropped meanwhile) needs nothing: no ciphertext kept
            self._idle += 1
            self.feed(end)

    def feed(self, now: float) -> None:
        if self._idle == 0:
            return
        for job in self._spec.plan(self._idle):
            seal_s = self._sender.seal_s(job.key.length)
            self.busy_s += seal_s
            self._ends[job.job_id] = now + seal_s
            heapq.heappush(self._running, (now + seal_s, job.job_id))
            self._idle -= 1


class PipeLLMSender(Sender):
    """Every chunk is decided by `spec`; pre-sealed chunks skip the seal on the host's path.

    Versions are all 0: the simulator has no host writes, so nothing is ever stale.
    """

    def __init__(self, wire: Wire, hardware: HardwareProfile, spec: Speculator, *, spare_cores: int) -> None:
        super().__init__(wire, hardware)
        self._spec = spec
        self.workers = VirtualWorkers(spec, spare_cores, self)
        self.wait_s = 0.0  # host time spent waiting for a job already sealing the wanted chunk
        self.waits = 0

    @property
    def speculator(self) -> Speculator:
        return self._spec

    def send(self, key: TransferKey, not_before: float) -> float:
        t = max(self._host, not_before)
        self.workers.advance(t)
        decision = self._spec.request(key, 0)
        while isinstance(decision, Wait):
            end = self.workers.end_of(decision.job_id)
            self.waits += 1
            self.wait_s += max(0.0, end - t)
            t = max(t, end)
            self.workers.advance(t)
            decision = self._spec.request(key, 0)
        self.workers.feed(t)
        for iv in decision.nop_ivs:
            t += self._hw.message_s
            self._wire.emit(iv, NOP_BYTES, t)
        t += self._hw.message_s
        if not isinstance(decision, Commit | PadThenCommit):  # Relinquish | SealNow: seal now
            t += self.seal_s(key.length)
        self._host = t
        assert self._spec.next_iv == decision.iv + 1, "the channel counter must follow the speculator"
        return self._wire.emit(decision.iv, key.length, t)
