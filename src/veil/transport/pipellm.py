"""`pipellm`: the CC data path with speculative pipelined encryption (PipeLLM, ASPLOS 2025).

Same interface, channel and threat model as `cc` (docs/cc-protocol.md); what changes is who seals when.

Host to device: a transfer `TransferKey(source_id, offset, nbytes)` is announced to the sealer (its
predictor learns it once), then split into 1 MiB chunk requests (`keys.chunks`). For each, the sealer's
speculator decides (commit a chunk a worker sealed ahead, pad with NOPs then commit,
or relinquish and seal now); the transport emits the decision's messages into the bounce ring in
counter order while the copy engine opens them (NOPs and burned IVs are authenticated and discarded,
data goes into the destination). Pre-sealed chunks committed back to back are handed over as one
submission of at most `submit_chunks` (`pipellm.submission`: one wake of the copy engine). `h2d`
returns once every message is emitted, like `cc`. The time from one `h2d` to the next (the caller's
compute included) is reported to the governor of the current phase (`enter_phase`: prefill,
decode), which keeps speculation in that phase only while it measures faster than sealing in the
caller there.

Device to host (`async_d2h`, default): the copy engine seals; the host half (`HostOpening`: take
the messages in ring order, binding each to the receiver's counter; open them on one of
`decrypt_threads` lanes; copy into the destination in counter order) runs in the background
(`Decryptor`). Until it has run, the destination `HostBuffer` is *pending*:
its `write()` context is held open (so `writing` is True and `stable_version()` is None: nothing
speculates on it), and any read through veil must call `ensure_host_ready(buffer)` first, which
decrypts it now if no lane has. Waiting on the returned event does the same.
An `h2d` from a pending buffer, and a worker about to seal one, force it first.

Lifecycle: enter the transport (`with make_transport(...) as t`) to start its workers and decryption
lanes; `close()` drains and stops them. A sealing worker that fails turns the transport synchronous
(every chunk sealed in the caller, as `cc`) and records the error in `stats().pipellm.worker_error`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from contextlib import ExitStack, suppress

from veil.cc.channel import ReceiverChannel, StagingPool, TakenMessage, message_pieces
from veil.cc.device import Device, DeviceBuffer
from veil.cc.errors import IntegrityError
from veil.cc.host import HostBuffer, copy_bytes
from veil.cc.session import Direction
from veil.cc.stream import Event
from veil.pipellm.decisions import Commit
from veil.pipellm.decryptor import Decryptor, PendingTransfer
from veil.pipellm.governor import Phase
from veil.pipellm.keys import TransferKey, chunk_count, chunks
from veil.pipellm.options import PipeLLMOptions, PipeLLMStats
from veil.pipellm.sealer import Sealer, SealFunction, Start, seal_chunk
from veil.pipellm.submission import Submission
from veil.transport.base import Span, TransportKind, TransportOptions, TransportStats
from veil.transport.sealed import SealedTransport, open_on_host

_END = object()


class DeviceSchedule:
    """The copy engine's half of one host-to-device transfer: open messages as the host announces them.

    The host announces, in emission order, a destination slice for each data message (`data`) or a
    discard for each NOP / burned IV (`discard`), then `finish()`. `run` executes on the copy engine.
    """

    def __init__(self, receiver: ReceiverChannel) -> None:
        self._receiver = receiver
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()

    def data(self, *outs: memoryview) -> None:
        """Announce one data message per destination slice (a submission's run: one hand-over)."""
        self._items.put(outs)

    def discard(self) -> None:
        self._items.put(None)

    def finish(self) -> None:
        self._items.put(_END)

    def run(self) -> None:
        while (item := self._items.get()) is not _END:
            if item is None:
                self._receiver.receive(None)
                continue
            assert isinstance(item, tuple)
            for out in item:
                self._receiver.receive(out)


class HostOpening:
    """The host's half of one device-to-host transfer, in the decryptor's phases (an `Opening`).

    Same guarantees as `ReceiverChannel.receive_chunked`, with the work split (`ReceiverChannel.take`
    and `open`) so that lanes can open transfers in parallel:
    - `take` (one transfer at a time, in ring order): each message is bound to the receiver's own
      next counter and the epoch's keys, copied out of its untrusted slot exactly once into private
      staging, and only then its slot released. Nothing carried with the data chooses the IV.
    - `open` (any lane): authenticate and decrypt each message in place; any failure poisons the
      receiver (which closes the ring) and raises IntegrityError.
    - `commit` (in counter order, only if nothing failed before): copy every plaintext into the
      destination. A transfer's destination is written only after *all* its messages authenticated.
    - `finish` (always): return the staging, end the destination's `write()` (it is no longer
      pending), fail closed on any failure, and report a device-side failure as itself.
    """

    def __init__(
        self,
        receiver: ReceiverChannel,
        target: memoryview,
        device_event: Event,
        writing: ExitStack,
        staging: StagingPool,
    ) -> None:
        self._receiver = receiver
        self._target = target
        self._device_event = device_event
        self._writing = writing
        self._staging = staging
        self._buffers: list[memoryview] = []  # staging taken, returned at finish
        self._messages: list[TakenMessage] = []
        self._plaintexts: list[memoryview] = []

    def pieces(self) -> list[memoryview]:
        """The destination slice of each message (one empty slice for an empty transfer: a NOP)."""
        return message_pieces(self._target, self._receiver.max_message_bytes)

    def take(self) -> None:
        for piece in self.pieces():
            buffer = self._staging.take()
            self._buffers.append(buffer)
            self._messages.append(self._receiver.take(len(piece), buffer))

    def open(self) -> None:
        self._plaintexts = [self._receiver.open(message) for message in self._messages]
        self._device_event.wait()

    def commit(self) -> None:
        for plaintext, piece in zip(self._plaintexts, self.pieces(), strict=True):
            copy_bytes(piece, plaintext)
        self._receiver.delivered([len(p) for p in self._plaintexts])

    def finish(self, error: BaseException | None) -> BaseException | None:
        for buffer in self._buffers:
            self._staging.give(buffer)
        self._buffers.clear()
        self._messages.clear()
        self._plaintexts.clear()
        self._writing.close()
        if error is None:
            return None
        self._receiver.fail_closed()  # whatever failed, nothing after it opens until a re-key
        if isinstance(error, IntegrityError):  # the ring is closed: the device's event completes
            try:
                self._device_event.wait()
            except IntegrityError:
                pass
            except BaseException as device_error:
                device_error.__cause__ = error
                return device_error
        return error


class PipeLLMTransport(SealedTransport):
    """Seals ahead on worker threads, decrypts device-to-host traffic in the background.

    Args:
        device: a started device.
        options: settings common to transports (link shape, auto re-key).
        pipellm: workers, depth, checked mode, predictor, governor (defaults when None).
        _seal: test seam through which workers seal (inject failures here).
    """

    kind = TransportKind.PIPELLM

    def __init__(
        self,
        device: Device,
        options: TransportOptions | None = None,
        pipellm: PipeLLMOptions | None = None,
        *,
        _seal: SealFunction = seal_chunk,
    ) -> None:
        super().__init__(device, options)
        self.pipellm = pipellm or PipeLLMOptions()
        self._sealer = Sealer(self.link.host_tx, self.pipellm, prepare_source=self._ready_quietly, seal=_seal)
        self._decryptor = Decryptor(f"{device.name}-pipellm-decrypt", lanes=self.pipellm.decrypt_threads)
        self._staging = StagingPool(self.link.d2h_ring.slot_bytes)  # the lanes' private copies of messages
        self._pending: dict[int, PendingTransfer] = {}  # latest async d2h into each host buffer
        self._unreported: list[Event] = []  # async d2h events since the last synchronize()
        self._pending_lock = threading.Lock()
        self._d2h_async = 0
        self._rekeys = 0

    # lifecycle -------------------------------------------------------------------------------
    def _start(self) -> None:
        self._sealer.__enter__()
        self._decryptor.__enter__()

    def close(self) -> None:
        """Finish in-flight transfers (decrypting what is pending), then stop every thread (idempotent)."""
        if self._closed:
            return
        super().close()
        with self._lock:
            self._decryptor.close()
            self._sealer.close()

    def synchronize(self) -> None:
        """Wait for every transfer, decrypt every pending device-to-host transfer, raise the first error."""
        with self._pending_lock:
            events, self._unreported = self._unreported, []
        errors = []
        for event in events:
            try:
                event.wait()
            except BaseException as exc:
                errors.append(exc)
        super().synchronize()
        if errors:
            raise errors[0]

    def rekey(self) -> None:
        """Let transfers and decryptions finish, then move both directions to a fresh epoch.

        Reservations of the old epoch are dropped (nothing sealed under them is ever emitted after).
        This is the only way to lift the poison after an `IntegrityError`.
        """
        with self._lock:
            self._decryptor.drain()  # every lane idle: no message of this epoch is left to open
            self._sealer.new_epoch()
            super().rekey()
            self._decryptor.reset()
            self._rekeys += 1

    # asynchronous device-to-host: the readers' contract ----------------------------------------------
    def pending(self, buffer: HostBuffer) -> bool:
        """True while a device-to-host transfer into `buffer` has not been decrypted yet."""
        with self._pending_lock:
            job = self._pending.get(buffer.source_id)
        return job is not None and not job.query()

    def ensure_host_ready(self, buffer: HostBuffer) -> None:
        """Make every device-to-host transfer into `buffer` land, decrypting it now if needed.

        Call before reading a buffer that was a `d2h` destination (the transport does so itself for
        `h2d` sources and for speculative sealing). Returns at once if nothing is pending.

        Raises:
            IntegrityError: if that transfer failed to authenticate (again on every call; the
                buffer's bytes were not written).
        """
        with self._pending_lock:
            job = self._pending.get(buffer.source_id)
        if job is None:
            return
        job.wait()
        with self._pending_lock:
            if self._pending.get(buffer.source_id) is job:
                del self._pending[buffer.source_id]

    # statistics ------------------------------------------------------------------------------------
    def stats(self) -> TransportStats:
        """Channel counters plus what speculation, the governor and asynchronous decryption did."""
        counters = self._sealer.counters
        pipellm = PipeLLMStats(
            speculator=self._sealer.speculator_stats(),
            governor=self._sealer.governor_stats(),
            governor_by_phase={p.value: g for p, g in self._sealer.governor_stats_by_phase().items()},
            wait_s=counters.wait_s,
            sync_seal_s=counters.sync_seal_s,
            check_s=counters.check_s,
            check_mismatches=counters.check_mismatches,
            burned_ciphertexts=counters.burned_ciphertexts,
            worker_error=self._sealer.error,
            synchronous=self._sealer.synchronous,
            d2h_async=self._d2h_async,
            d2h_forced=self._decryptor.forced,
            rekeys=self._rekeys,
        )
        return dataclasses.replace(super().stats(), pipellm=pipellm)

    @property
    def pipeline(self) -> tuple:
        """The speculator's current reservations (for inspection and tests)."""
        return self._sealer.pipeline

    # transfers -------------------------------------------------------------------------------------
    def _h2d(self, src: HostBuffer, dst: DeviceBuffer, span: Span) -> Event:
        if self._pending:  # a read of the dict, no lock: a d2h into `src` racing this h2d is the caller's bug
            self.ensure_host_ready(src)
        with self._lock:
            now = time.perf_counter()  # the governor's clock: from one h2d to the next
            sender = self.link.host_tx
            count = chunk_count(span.nbytes, sender.max_message_bytes)
            self._prepare(sender, count)  # what `cc` checks: enough for the transfer itself
            transfer = TransferKey(src.source_id, span.src_offset, span.nbytes, Direction.H2D)
            options = self.pipellm
            margin = count + (options.depth + 1) * (1 + options.max_pad)
            start = self._sealer.begin(transfer, src, now=now, margin=margin)
            if start is Start.REKEY:  # speculation needs IVs beyond the transfer's own
                self._prepare(sender, count, used=self._sealer.reach(), margin=margin)
                start = self._sealer.begin(transfer, src, margin=margin)
                assert start is not Start.REKEY, "a fresh epoch has the IVs _prepare checked"
            target = dst.memory()[span.dst]
            if start is Start.QUIET:  # speculation off: exactly what `cc` does
                return self._send_in_caller(src.memory()[span.src], target)
            keys = chunks(transfer, sender.max_message_bytes)  # only now: the quiet path needs none
            schedule = DeviceSchedule(self.link.device_rx)
            event = self.device.copy_engine.submit(schedule.run)
            submission: Submission[tuple[Commit, memoryview]] = Submission(options.submit_chunks)

            def submit() -> None:  # the gathered commits, in counter order, as one hand-over
                run = submission.take()
                if run:
                    schedule.data(*(piece for _, piece in run))
                    self._sealer.commit_run([decision for decision, _ in run])

            try:
                for key in keys:
                    decision = self._sealer.decide(key, src, before_wait=submit)
                    at = key.offset - span.src_offset
                    piece = target[at : at + key.length]
                    if submission.joins(decision):
                        if submission.add((decision, piece)):
                            submit()
                        continue
                    submit()
                    for _ in decision.nop_ivs:
                        schedule.discard()
                    schedule.data(piece)
                    self._sealer.carry_out(decision, src)
                submit()
            except BaseException:
                self.link.h2d_ring.close()  # the device must not wait for messages that will not come
                raise
            finally:
                schedule.finish()
            return event

    def _enter_phase(self, phase: Phase) -> None:
        with self._lock:  # ordered with transfers: the change falls between two h2d's starts
            self._sealer.enter_phase(phase, time.perf_counter())

    def _hint(self, src: HostBuffer, span: Span) -> None:
        with self._lock:
            self._sealer.hint([TransferKey(src.source_id, span.src_offset, span.nbytes, Direction.H2D)], src)

    def _d2h(self, src: DeviceBuffer, dst: HostBuffer, span: Span) -> Event:
        with self._lock:
            writing = ExitStack()
            writing.enter_context(dst.write())  # held until decrypted: the buffer is pending
            try:
                device_event = self._seal_on_device(src, span)
            except BaseException:
                writing.close()
                raise
            target = dst.memory()[span.dst]
            if not self.pipellm.async_d2h:
                with writing:
                    open_on_host(self.link.host_rx, target, device_event)
                return device_event
            opening = HostOpening(self.link.host_rx, target, device_event, writing, self._staging)
            job = self._decryptor.submit(opening)
            with self._pending_lock:
                self._pending[dst.source_id] = job
                self._unreported.append(job)
            self._d2h_async += 1
            self._sealer.observe_device_to_host(
                [TransferKey(dst.source_id, span.dst_offset, span.nbytes, Direction.D2H)], dst
            )
            return job

    # internals ---------------------------------------------------------------------------------
    def _ready_quietly(self, buffer: HostBuffer) -> None:
        """A worker's view of `ensure_host_ready`: a failed decryption left the buffer untouched, so
        its current bytes and version are still what a later request would send."""
        with suppress(IntegrityError):
            self.ensure_host_ready(buffer)
