"""Sealed transports: what `cc` and `pipellm` share, and `cc` itself (H100 CC as the driver does it).

`SealedTransport` owns the secure link (session, both channels, both bounce rings), serializes
transfers and re-keys (so the order of messages in each ring matches the order of the copy engine's
commands), re-keys before an epoch would run out of IVs, and opens device-to-host traffic.

`cc`: host to device, the calling thread seals 1 MiB chunks into private staging and copies each into
a bounce slot while the copy engine opens them, chunk by chunk, into the destination as they arrive.
Device to host: the copy engine seals, the calling thread opens; `d2h` therefore returns a completed
event (asynchronous decryption is what `pipellm` adds).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from veil.cc.bounce import POISONED_MESSAGE
from veil.cc.channel import ChannelStats, ReceiverChannel, SenderChannel, message_count
from veil.cc.device import Device, DeviceBuffer
from veil.cc.errors import IntegrityError, RekeyRequired
from veil.cc.host import HostBuffer
from veil.cc.link import SecureLink
from veil.cc.stream import Event
from veil.transport.base import Span, Transport, TransportKind, TransportOptions, TransportStats


@dataclass(frozen=True)
class SealedStats:
    """Channel counters of a sealed transport (operators' view; never shown to the peer).

    Attributes:
        h2d: the host-to-device sender's counters (messages, NOPs, plaintext bytes, re-keys).
        d2h: the device-to-host sender's counters.
        integrity_failures: messages either receiver refused as forged, replayed or reordered.
        epoch: the link's current epoch (re-keys so far).
    """

    h2d: ChannelStats
    d2h: ChannelStats
    integrity_failures: int
    epoch: int


class SealedTransport(Transport):
    """A transport whose every byte crosses the bus sealed (see module docstring).

    Attributes:
        link: the secure link (channels, rings, channel statistics).
    """

    def __init__(self, device: Device, options: TransportOptions | None = None) -> None:
        super().__init__(device, options)
        self.link = SecureLink(self.options.link)
        self._lock = threading.RLock()  # serializes transfers and re-keys (ring order = command order)

    def rekey(self) -> None:
        """Wait until the copy engine is idle, then move both directions to a fresh epoch.

        This is the only way to lift the poison after an `IntegrityError`.
        """
        with self._lock:
            self.device.copy_engine.submit(lambda: None).wait()
            self.link.rekey()

    def stats(self) -> TransportStats:
        base = super().stats()
        link = self.link
        sealed = SealedStats(
            h2d=_copy(link.host_tx.stats),
            d2h=_copy(link.device_tx.stats),
            integrity_failures=link.device_rx.stats.integrity_failures
            + link.host_rx.stats.integrity_failures,
            epoch=link.epoch,
        )
        return TransportStats(
            base.kind, base.h2d_transfers, base.h2d_bytes, base.d2h_transfers, base.d2h_bytes, sealed=sealed
        )

    def _prepare(
        self, sender: SenderChannel, messages: int, *, used: int | None = None, margin: int = 0
    ) -> None:
        """Refuse a poisoned link; re-key first if the epoch may run out of IVs during the transfer.

        Args:
            messages: messages the transfer needs.
            used: IVs of the epoch already spoken for (default: the sender's reserved counters).
            margin: IVs that must be left beyond (speculation's NOPs).
        """
        if self.link.poisoned:
            raise IntegrityError(POISONED_MESSAGE)
        if messages > sender.counter_limit:
            raise ValueError(f"a transfer of {messages} messages needs more IVs than one epoch has")
        if sender.lacks_ivs(messages, used=used, margin=margin):
            if not self.options.auto_rekey:
                raise RekeyRequired("not enough IVs left in this epoch; call rekey()")
            self.rekey()

    def _send_in_caller(self, source: memoryview, target: memoryview) -> Event:
        """Seal `source` chunk by chunk in this thread while the copy engine opens each into `target`.

        Call with the transfer lock held, after `_prepare`. The copy engine's half is queued first, so
        it opens every message as soon as it is published.
        """
        receiver = self.link.device_rx
        event = self.device.copy_engine.submit(lambda: receiver.receive_chunked(target))
        try:
            self.link.host_tx.send_chunked(source)
        except BaseException:
            self.link.h2d_ring.close()  # the device must not wait for messages that will not come
            raise
        return event

    def _seal_on_device(self, src: DeviceBuffer, span: Span) -> Event:
        """Submit the copy engine's half of a device-to-host transfer (after `_prepare`)."""
        self._prepare(self.link.device_tx, message_count(span.nbytes, self.link.device_tx.max_message_bytes))
        return self.device.copy_engine.submit(device_sealer(self.link, src.memory()[span.src]))


class CcTransport(SealedTransport):
    """Seals in the caller, opens on the copy engine (and the reverse for device to host)."""

    kind = TransportKind.CC

    def _h2d(self, src: HostBuffer, dst: DeviceBuffer, span: Span) -> Event:
        with self._lock:
            sender = self.link.host_tx
            self._prepare(sender, message_count(span.nbytes, sender.max_message_bytes))
            return self._send_in_caller(src.memory()[span.src], dst.memory()[span.dst])

    def _d2h(self, src: DeviceBuffer, dst: HostBuffer, span: Span) -> Event:
        with self._lock, dst.write():
            device_event = self._seal_on_device(src, span)
            open_on_host(self.link.host_rx, dst.memory()[span.dst], device_event)
            return device_event


def device_sealer(link: SecureLink, source: memoryview) -> Callable[[], None]:
    """The copy engine's half of a device-to-host transfer: seal `source` chunk by chunk into the ring.

    On any failure the ring is closed, so the host, waiting for messages, is told instead of hanging.
    """
    sender, ring = link.device_tx, link.d2h_ring

    def seal_on_device() -> None:
        try:
            sender.send_chunked(source)
        except BaseException:
            ring.close()
            raise

    return seal_on_device


def open_on_host(receiver: ReceiverChannel, target: memoryview, device_event: Event) -> None:
    """The host's half of a device-to-host transfer: open every message into `target`.

    A device-side failure that closed the ring is raised as itself (not as an integrity failure).

    Raises:
        IntegrityError: if a message fails to authenticate (`target` then holds no unverified byte).
    """
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


def _copy(stats: ChannelStats) -> ChannelStats:
    return ChannelStats(**vars(stats))
