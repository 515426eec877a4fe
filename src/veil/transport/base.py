"""The one interface engines use to move bytes between host memory and the device.

Every transport offers asynchronous `h2d` and `d2h` over byte ranges of a `HostBuffer` and a
`DeviceBuffer`, each returning an `Event`; `hint()` and `enter_phase()` (optional knowledge an engine
may give); `synchronize()`; `stats()`; and an explicit lifecycle: a transport moves nothing until it is
entered (`with make_transport(...) as t:`) and `close()` (or leaving the block) drains it. Sealed
transports (`SealedTransport`) also have `link` and `rekey()`. Engines never learn which implementation
they hold; `TransportKind` names them and `veil.transport.make_transport` builds them.

Contract shared by all implementations:
- A transfer may read its source at any time until its event completes (and, for speculative
  transports, earlier: see `HostBuffer`), so the caller must not write the source through veil's back.
- `d2h` bumps the destination `HostBuffer`'s version while it writes.
- Errors of the device's half (including `IntegrityError`) surface from `Event.wait()` and from
  `synchronize()`; errors of the host's half are raised by the call itself.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

import torch

from veil.cc.device import Device, DeviceBuffer
from veil.cc.host import HostBuffer
from veil.cc.link import LinkConfig
from veil.cc.stream import Event
from veil.pipellm.governor import Phase
from veil.trace import Op, TraceRecorder

if TYPE_CHECKING:  # the richer statistics of the sealed kinds (they import this module)
    from veil.pipellm.options import PipeLLMStats
    from veil.transport.sealed import SealedStats


@dataclass(frozen=True)
class TransportStats:
    """What a transport did since it was created (a snapshot; `Transport.stats()`).

    Attributes:
        kind: which transport (`TransportKind` value).
        h2d_transfers, h2d_bytes, d2h_transfers, d2h_bytes: calls and bytes per direction.
        sealed: channel counters per direction (sealed transports only).
        pipellm: speculation, asynchronous decryption and governor counters (`pipellm` only).
    """

    kind: str
    h2d_transfers: int = 0
    h2d_bytes: int = 0
    d2h_transfers: int = 0
    d2h_bytes: int = 0
    sealed: SealedStats | None = None
    pipellm: PipeLLMStats | None = None


class TransportKind(enum.Enum):
    """Which transport to build (values are the CLI / config spellings)."""

    PLAIN = "plain"
    CC = "cc"
    PIPELLM = "pipellm"


@dataclass(frozen=True)
class TransportOptions:
    """Settings common to transports.

    Attributes:
        link: chunk size, bounce ring size and counter limit of the secure link (CC transports).
        auto_rekey: re-key transparently when a transfer needs more IVs than the epoch has left;
            when False such a transfer raises `RekeyRequired`.
    """

    link: LinkConfig = field(default_factory=LinkConfig)
    auto_rekey: bool = True


@dataclass(frozen=True)
class Span:
    """A validated byte range of a transfer."""

    src_offset: int
    dst_offset: int
    nbytes: int

    @property
    def src(self) -> slice:
        """Source byte slice."""
        return slice(self.src_offset, self.src_offset + self.nbytes)

    @property
    def dst(self) -> slice:
        """Destination byte slice."""
        return slice(self.dst_offset, self.dst_offset + self.nbytes)

    @classmethod
    def of(
        cls, src_nbytes: int, dst_nbytes: int, src_offset: int, dst_offset: int, nbytes: int | None
    ) -> Span:
        """Validate offsets and length against both buffers' sizes.

        Args:
            nbytes: bytes to move; None moves everything from src_offset to the source's end.

        Raises:
            ValueError: if a value is negative or a range runs past its buffer.
        """
        if src_offset < 0 or dst_offset < 0:
            raise ValueError("offsets must be >= 0")
        if nbytes is None:
            nbytes = src_nbytes - src_offset
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        if src_offset + nbytes > src_nbytes:
            raise ValueError(f"source range [{src_offset}, {src_offset + nbytes}) exceeds {src_nbytes} bytes")
        if dst_offset + nbytes > dst_nbytes:
            raise ValueError(
                f"destination range [{dst_offset}, {dst_offset + nbytes}) exceeds {dst_nbytes} bytes"
            )
        return cls(src_offset, dst_offset, nbytes)


class Transport(ABC):
    """Moves bytes between host memory and one device.

    Args:
        device: a started device (inside its context).
        options: transport settings; defaults when None.

    Raises:
        RuntimeError: if the device is not started.
    """

    kind: ClassVar[TransportKind]
    recorder: TraceRecorder | None = None  # when set, every h2d / d2h / hint is recorded (veil.trace)

    def __init__(self, device: Device, options: TransportOptions | None = None) -> None:
        _ = device.copy_engine  # raises if the device is not started
        self.device = device
        self.options = options or TransportOptions()
        self._started = False
        self._closed = False
        self._counts = [0, 0, 0, 0]  # h2d transfers, h2d bytes, d2h transfers, d2h bytes

    def __enter__(self) -> Transport:
        if self._started:
            raise RuntimeError("transport is already started")
        self._start()
        self._started = True
        return self

    def _start(self) -> None:  # noqa: B027 - optional: transports with no threads start nothing
        """Start what the transport runs (threads); called once by `__enter__`."""

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def h2d(
        self,
        src: HostBuffer,
        dst: DeviceBuffer,
        *,
        src_offset: int = 0,
        dst_offset: int = 0,
        nbytes: int | None = None,
    ) -> Event:
        """Copy `nbytes` from host `src` to device `dst`; the event completes when they are in `dst`.

        Raises:
            ValueError: on a bad range. RuntimeError: if closed.
            IntegrityError: if the link is poisoned (CC). RekeyRequired: if out of IVs, auto_rekey off.
        """
        self._check_open()
        span = Span.of(src.nbytes, dst.nbytes, src_offset, dst_offset, nbytes)
        if self.recorder is not None:
            self.recorder.transfer(Op.H2D, src.source_id, span.src_offset, span.nbytes, src.version)
        event = self._h2d(src, dst, span)
        self._counts[0] += 1
        self._counts[1] += span.nbytes
        return event

    def d2h(
        self,
        src: DeviceBuffer,
        dst: HostBuffer,
        *,
        src_offset: int = 0,
        dst_offset: int = 0,
        nbytes: int | None = None,
    ) -> Event:
        """Copy `nbytes` from device `src` to host `dst`; the event completes when they are in `dst`.

        Raises:
            as `h2d`.
        """
        self._check_open()
        span = Span.of(src.nbytes, dst.nbytes, src_offset, dst_offset, nbytes)
        if self.recorder is not None:
            self.recorder.transfer(Op.D2H, dst.source_id, span.dst_offset, span.nbytes, dst.version)
        event = self._d2h(src, dst, span)
        self._counts[2] += 1
        self._counts[3] += span.nbytes
        return event

    def hint(self, src: HostBuffer, *, src_offset: int = 0, nbytes: int | None = None) -> None:
        """Tell the transport that this host range will be sent to the device soon.

        Optional knowledge an engine may give (PipeLLM's explicit hints); transports that seal
        nothing ahead (`plain`, `cc`) ignore it, and a speculative one must work without it.

        Raises:
            ValueError: on a bad range. RuntimeError: if closed.
        """
        self._check_open()
        span = Span.of(src.nbytes, src.nbytes, src_offset, 0, nbytes)
        if self.recorder is not None:
            self.recorder.transfer(Op.HINT, src.source_id, span.src_offset, span.nbytes, src.version)
        self._hint(src, span)

    def _hint(self, src: HostBuffer, span: Span) -> None:  # noqa: B027 - optional: ignoring is valid
        """Use a hint (see `hint`); the default ignores it."""

    def enter_phase(self, phase: Phase) -> None:
        """Say that the transfers from now on belong to `phase` (an engine calls it before each step's
        transfers: `Phase.PREFILL` or `Phase.DECODE`); until it is first called, `Phase.UNLABELLED`.

        Optional knowledge, like `hint`: `pipellm` keeps one governor per phase (so a prefill can
        speculate while decode seals in the caller); `plain` and `cc` ignore it.

        Raises:
            TypeError: if `phase` is not a `Phase`. RuntimeError: if closed.
        """
        if not isinstance(phase, Phase):
            raise TypeError(f"phase must be a Phase, not {type(phase).__name__}")
        self._check_open()
        if self.recorder is not None:
            self.recorder.phase(phase.value)
        self._enter_phase(phase)

    def _enter_phase(self, phase: Phase) -> None:  # noqa: B027 - optional: ignoring is valid
        """Use a phase (see `enter_phase`); the default ignores it."""

    def upload(self, tensor: torch.Tensor) -> DeviceBuffer:
        """Allocate a device tensor like `tensor` (contiguous, CPU, any dtype) and copy it in; blocks."""
        host = HostBuffer(tensor)
        buffer = self.device.empty(tuple(tensor.shape), tensor.dtype)
        try:
            self.h2d(host, buffer).wait()
        except BaseException:
            buffer.free()
            raise
        return buffer

    def download(self, buffer: DeviceBuffer) -> torch.Tensor:
        """Copy a device buffer into a new CPU tensor of its dtype and shape; blocks."""
        host = HostBuffer.empty(buffer.shape, buffer.dtype)
        self.d2h(buffer, host).wait()
        return host.tensor

    def stats(self) -> TransportStats:
        """A snapshot of what this transport did (see `TransportStats`)."""
        h2d_transfers, h2d_bytes, d2h_transfers, d2h_bytes = self._counts
        return TransportStats(self.kind.value, h2d_transfers, h2d_bytes, d2h_transfers, d2h_bytes)

    def synchronize(self) -> None:
        """Wait for every transfer issued so far; raise the first error of the device's half."""
        self.device.copy_engine.synchronize()

    def close(self) -> None:
        """Wait for in-flight transfers and refuse new ones (idempotent; errors stay in their events)."""
        if not self._closed:
            self._closed = True
            self.device.copy_engine.submit(lambda: None).wait()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("transport is closed")
        if not self._started:
            raise RuntimeError(f"the {self.kind.value} transport is not started; use it as a context manager")

    @abstractmethod
    def _h2d(self, src: HostBuffer, dst: DeviceBuffer, span: Span) -> Event: ...

    @abstractmethod
    def _d2h(self, src: DeviceBuffer, dst: HostBuffer, span: Span) -> Event: ...
