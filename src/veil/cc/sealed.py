"""`cc`: H100 confidential computing as the driver does it.

Host to device: the calling thread seals 1 MiB chunks straight into bounce slots while the copy engine
opens them, chunk by chunk, into the destination as they arrive. Device to host: the copy engine seals,
the calling thread opens; `d2h` therefore returns a completed event (asynchronous decryption is what
the pipellm transport adds). Transfers through one transport are serialized so that the order of
messages in each ring matches the order of the copy engine's commands.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from veil.cc.bounce import POISONED_MESSAGE
from veil.cc.channel import SenderChannel, message_count
from veil.cc.device import Device, DeviceBuffer
from veil.cc.errors import IntegrityError, RekeyRequired
from veil.cc.host import HostBuffer
from veil.cc.link import SecureLink
from veil.cc.stream import Event
from veil.cc.transport import Span, Transport, TransportKind, TransportOptions


class CcTransport(Transport):
    """Seals in the caller, opens on the copy engine (and the reverse for device to host).

    Attributes:
        link: the secure link (channels, rings, statistics); its `rekey()` is wrapped by `rekey()`.
    """

    kind = TransportKind.CC

    def __init__(self, device: Device, options: TransportOptions | None = None) -> None:
        super().__init__(device, options)
        self.link = SecureLink(self.options.link)
        self._lock = threading.RLock()

    def rekey(self) -> None:
        """Wait until the copy engine is idle, then move both directions to a fresh epoch.

        This is the only way to lift the poison after an `IntegrityError`.
        """
        with self._lock:
            self.device.copy_engine.submit(lambda: None).wait()
            self.link.rekey()

    def _h2d(self, src: HostBuffer, dst: DeviceBuffer, span: Span) -> Event:
        with self._lock:
            self._prepare(self.link.host_tx, span.nbytes)
            source, target = src.memory()[span.src], dst.memory()[span.dst]
            receiver = self.link.device_rx
            event = self.device.copy_engine.submit(lambda: receiver.receive_chunked(target))
            try:
                self.link.host_tx.send_chunked(source)
            except BaseException:
                self.link.h2d_ring.close()  # the device must not wait for messages that will not come
                raise
            return event

    def _d2h(self, src: DeviceBuffer, dst: HostBuffer, span: Span) -> Event:
        with self._lock:
            self._prepare(self.link.device_tx, span.nbytes)
            source, target = src.memory()[span.src], dst.memory()[span.dst]
            with dst.write():
                event = self.device.copy_engine.submit(device_sealer(self.link, source))
                try:
                    self.link.host_rx.receive_chunked(target)
                except IntegrityError as host_error:
                    device_error = _settled_error(event)
                    if device_error is not None and not isinstance(device_error, IntegrityError):
                        raise device_error from host_error
                    raise
            event.wait()
            return event

    def _prepare(self, sender: SenderChannel, nbytes: int) -> None:
        if self.link.poisoned:
            raise IntegrityError(POISONED_MESSAGE)
        needed = message_count(nbytes, sender.max_message_bytes)
        if needed > sender.counter_limit:
            raise ValueError(f"a transfer of {nbytes} bytes needs more IVs than one epoch has")
        if sender.remaining() < needed:
            if not self.options.auto_rekey:
                raise RekeyRequired("not enough IVs left in this epoch; call rekey()")
            self.rekey()


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


def _settled_error(event: Event) -> BaseException | None:
    """The event's error once it has finished (it finishes promptly after the ring closed)."""
    try:
        event.wait()
    except BaseException as exc:
        return exc
    return None
