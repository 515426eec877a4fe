"""`plain`: no confidential computing; the copy engine copies bytes directly (the non-CC baseline)."""

from __future__ import annotations

from contextlib import ExitStack

from veil.cc.device import DeviceBuffer
from veil.cc.host import HostBuffer
from veil.cc.stream import Event
from veil.transport.base import Span, Transport, TransportKind


class PlainTransport(Transport):
    """Copies on the copy engine thread, like an asynchronous DMA without CC."""

    kind = TransportKind.PLAIN

    def _h2d(self, src: HostBuffer, dst: DeviceBuffer, span: Span) -> Event:
        source, target = src.bytes[span.src], dst.bytes[span.dst]
        return self.device.copy_engine.submit(lambda: target.copy_(source))

    def _d2h(self, src: DeviceBuffer, dst: HostBuffer, span: Span) -> Event:
        source, target = src.bytes[span.src], dst.bytes[span.dst]
        writing = ExitStack()
        writing.enter_context(dst.write())

        def copy() -> None:
            with writing:
                target.copy_(source)

        try:
            return self.device.copy_engine.submit(copy)
        except BaseException:
            writing.close()
            raise
