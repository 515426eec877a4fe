"""`pipellm`: the CC data path with speculative pipelined encryption (PipeLLM, ASPLOS 2025).

Same interface, channel and threat model as `cc` (docs/cc-protocol.md); what changes is who seals when.

Host to device: a transfer is split into chunk requests `TransferKey(source_id, offset, length)`. For
each, the speculator decides (commit a chunk a worker sealed ahead, pad with NOPs then commit, or
relinquish and seal now); the transport emits the decision's messages into the bounce ring in counter
order while the copy engine opens them (NOPs and burned IVs are authenticated and discarded, data
goes into the destination). `h2d` returns once every message is emitted, like `cc`.

Device to host (`async_d2h`, default): the copy engine seals; the host half (open, copy into the
destination) runs on a background thread. Until it has run, the destination `HostBuffer` is *pending*:
its `write()` context is held open (so `writing` is True and `stable_version()` is None: nothing
speculates on it), and any read through veil must call `ensure_host_ready(buffer)` first, which
decrypts it now if the background thread has not. Waiting on the returned event does the same.
An `h2d` from a pending buffer, and a worker about to seal one, force it first.

Lifecycle: enter the transport (`with make_transport(...) as t`) to start its workers and decryption
thread; `close()` drains and stops them. A sealing worker that fails turns the transport synchronous
(every chunk sealed in the caller, as `cc`) and records the error in `stats.worker_error`.
"""

from __future__ import annotations

import queue
import threading
from contextlib import ExitStack, suppress

from veil.cc.bounce import POISONED_MESSAGE
from veil.cc.channel import ReceiverChannel, SenderChannel, message_count
from veil.cc.device import Device, DeviceBuffer
from veil.cc.errors import IntegrityError, RekeyRequired
from veil.cc.host import HostBuffer
from veil.cc.link import SecureLink
from veil.cc.sealed import device_sealer
from veil.cc.stream import Event
from veil.cc.transport import Span, Transport, TransportKind, TransportOptions
from veil.pipellm.decryptor import Decryptor, PendingTransfer
from veil.pipellm.options import PipeLLMOptions, PipeLLMStats
from veil.pipellm.sealing import SealFunction, SealPipeline, seal_into_ring
from veil.pipellm.types import Direction, TransferKey

_END = object()


class DeviceSchedule:
    """The copy engine's half of one host-to-device transfer: open messages as the host announces them.

    The host announces, in emission order, a destination slice for each data message (`data`) or a
    discard for each NOP / burned IV (`discard`), then `finish()`. `run` executes on the copy engine.
    """

    def __init__(self, receiver: ReceiverChannel) -> None:
        self._receiver = receiver
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()

    def data(self, out: memoryview) -> None:
        self._items.put(out)

    def discard(self) -> None:
        self._items.put(None)

    def finish(self) -> None:
        self._items.put(_END)

    def run(self) -> None:
        while (item := self._items.get()) is not _END:
            assert item is None or isinstance(item, memoryview)
            self._receiver.receive(item)


class PipeLLMTransport(Transport):
    """Seals ahead on worker threads, decrypts device-to-host traffic in the background.

    Args:
        device: a started device.
        options: settings common to transports (link shape, auto re-key).
        pipellm: workers, depth, checked mode, predictor (defaults when None).
        _seal: test seam through which workers seal (inject failures here).

    Attributes:
        link: the secure link (channels, rings, channel statistics).
    """

    kind = TransportKind.PIPELLM

    def __init__(
        self,
        device: Device,
        options: TransportOptions | None = None,
        pipellm: PipeLLMOptions | None = None,
        *,
        _seal: SealFunction = seal_into_ring,
    ) -> None:
        super().__init__(device, options)
        self.pipellm = pipellm or PipeLLMOptions()
        slots_needed = self.pipellm.depth + self.pipellm.workers + 1
        if self.options.link.ring_slots < slots_needed:
            raise ValueError(
                f"the link has {self.options.link.ring_slots} bounce slots; pipellm with depth "
                f"{self.pipellm.depth} and {self.pipellm.workers} workers needs at least {slots_needed} "
                "(pre-sealed chunks hold their slots until emitted)"
            )
        self.link = SecureLink(self.options.link)
        self._lock = threading.RLock()  # serializes transfers and re-keys (ring order = command order)
        self._pipeline = SealPipeline(
            self.link.host_tx, self.pipellm, prepare_source=self._ready_quietly, seal=_seal
        )
        self._decryptor = Decryptor(f"{device.name}-pipellm-decrypt")
        self._pending: dict[int, PendingTransfer] = {}  # latest async d2h into each host buffer
        self._unreported: list[Event] = []  # async d2h events since the last synchronize()
        self._pending_lock = threading.Lock()
        self._started = False
        self._d2h_async = 0
        self._rekeys = 0

    # lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> PipeLLMTransport:
        if self._started:
            raise RuntimeError("transport is already started")
        self._pipeline.__enter__()
        self._decryptor.__enter__()
        self._started = True
        return self

    def close(self) -> None:
        """Finish in-flight transfers (decrypting what is pending), then stop every thread (idempotent)."""
        if self._closed:
            return
        super().close()
        with self._lock:
            self._decryptor.close()
            self._pipeline.close()

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
            self._decryptor.drain()
            self.device.copy_engine.submit(lambda: None).wait()
            self._pipeline.new_epoch()
            self.link.rekey()
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
    @property
    def stats(self) -> PipeLLMStats:
        """A snapshot of what speculation and asynchronous decryption did so far."""
        c = self._pipeline.counters
        return PipeLLMStats(
            speculator=self._pipeline.speculator_stats(),
            wait_s=c.wait_s,
            sync_seal_s=c.sync_seal_s,
            check_s=c.check_s,
            check_mismatches=c.check_mismatches,
            burned_ciphertexts=c.burned_ciphertexts,
            worker_error=self._pipeline.error,
            synchronous=self._pipeline.synchronous,
            d2h_async=self._d2h_async,
            d2h_forced=self._decryptor.forced,
            rekeys=self._rekeys,
        )

    # transfers -------------------------------------------------------------------------------------
    def _h2d(self, src: HostBuffer, dst: DeviceBuffer, span: Span) -> Event:
        self._check_started()
        self.ensure_host_ready(src)
        with self._lock:
            step = self.link.host_tx.max_message_bytes
            keys = _chunk_keys(src.source_id, span.src_offset, span.nbytes, step, Direction.H2D)
            self._prepare_h2d(len(keys))
            schedule = DeviceSchedule(self.link.device_rx)
            event = self.device.copy_engine.submit(schedule.run)
            target = dst.memory()[span.dst]
            try:
                for key in keys:
                    decision = self._pipeline.decide(key, src)
                    for _ in decision.nop_ivs:
                        schedule.discard()
                    start = key.offset - span.src_offset
                    schedule.data(target[start : start + key.length])
                    self._pipeline.carry_out(decision, src)
            except BaseException:
                self.link.h2d_ring.close()  # the device must not wait for messages that will not come
                raise
            finally:
                schedule.finish()
            return event

    def _hint(self, src: HostBuffer, span: Span) -> None:
        step = self.link.host_tx.max_message_bytes
        self._pipeline.hint(
            _chunk_keys(src.source_id, span.src_offset, span.nbytes, step, Direction.H2D), src
        )

    def _d2h(self, src: DeviceBuffer, dst: HostBuffer, span: Span) -> Event:
        self._check_started()
        with self._lock:
            step = self.link.device_tx.max_message_bytes
            self._prepare(self.link.device_tx, message_count(span.nbytes, step))
            source, target = src.memory()[span.src], dst.memory()[span.dst]
            writing = ExitStack()
            writing.enter_context(dst.write())  # held until decrypted: the buffer is pending
            try:
                device_event = self.device.copy_engine.submit(device_sealer(self.link, source))
            except BaseException:
                writing.close()
                raise

            def open_on_host() -> None:
                with writing:
                    _open_or_explain(self.link.host_rx, target, device_event)

            if not self.pipellm.async_d2h:
                open_on_host()
                return device_event
            job = self._decryptor.submit(open_on_host)
            with self._pending_lock:
                self._pending[dst.source_id] = job
                self._unreported.append(job)
            self._d2h_async += 1
            for key in _chunk_keys(dst.source_id, span.dst_offset, span.nbytes, step, Direction.D2H):
                self._pipeline.observe_device_to_host(key, dst)
            return job

    # internals ---------------------------------------------------------------------------------
    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("the pipellm transport is not started; use it as a context manager")

    def _ready_quietly(self, buffer: HostBuffer) -> None:
        """A worker's view of `ensure_host_ready`: a failed decryption left the buffer untouched, so
        its current bytes and version are still what a later request would send."""
        with suppress(IntegrityError):
            self.ensure_host_ready(buffer)

    def _prepare_h2d(self, messages: int) -> None:
        """Re-key first if the epoch may run out of IVs during this transfer (NOPs included)."""
        options = self.pipellm
        margin = messages + (options.depth + 1) * (1 + options.max_pad)
        self._prepare(self.link.host_tx, messages, used=self._pipeline.reach(), margin=margin)

    def _prepare(
        self, sender: SenderChannel, messages: int, *, used: int | None = None, margin: int = 0
    ) -> None:
        if self.link.poisoned:
            raise IntegrityError(POISONED_MESSAGE)
        limit = sender.counter_limit
        if messages > limit:
            raise ValueError(f"a transfer of {messages} messages needs more IVs than one epoch has")
        left = sender.remaining() if used is None else limit - used
        if left < max(messages, min(margin, limit)):
            if not self.options.auto_rekey:
                raise RekeyRequired("not enough IVs left in this epoch; call rekey()")
            self.rekey()


def _chunk_keys(
    source_id: int, offset: int, nbytes: int, step: int, direction: Direction
) -> list[TransferKey]:
    """One key per message for the host range [offset, offset + nbytes) (one empty key if empty)."""
    if nbytes == 0:
        return [TransferKey(source_id, offset, 0, direction)]
    return [
        TransferKey(source_id, offset + start, min(step, nbytes - start), direction)
        for start in range(0, nbytes, step)
    ]


def _open_or_explain(receiver: ReceiverChannel, target: memoryview, device_event: Event) -> None:
    """Open a device-to-host transfer; a device-side failure that closed the ring is raised as itself."""
    try:
        receiver.receive_chunked(target)
    except IntegrityError as host_error:
        try:
            device_event.wait()
        except IntegrityError:
            raise host_error from None
        except BaseException as device_error:
            raise device_error from host_error
        raise
    device_event.wait()
