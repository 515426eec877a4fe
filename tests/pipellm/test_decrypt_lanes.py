"""The pool of decryption lanes, attacked: counters bound in ring order, in-order commits, fail-closed.

Every test runs the real channel, ring and AES-GCM with 4 lanes. The only seam is
`ReceiverChannel.open` (the lanes' call into AES-GCM; the device's own opening of host-to-device
messages passes through untouched), wrapped to record which counter and epoch each message was opened
under, and to hold or fail one message's lane on purpose.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch

from veil.cc.bounce import Descriptor
from veil.cc.channel import ReceiverChannel, TakenMessage
from veil.cc.device import Device, DeviceBuffer
from veil.cc.errors import IntegrityError
from veil.cc.host import HostBuffer
from veil.cc.link import LinkConfig
from veil.pipellm.options import PipeLLMOptions, default_decrypt_threads
from veil.transport.base import TransportOptions
from veil.transport.pipellm import PipeLLMTransport

from .support import CHUNK, SMALL_LINK, options

FILL = 0x5A
LANES = 4
pytestmark = pytest.mark.timeout(60)  # a deadlock fails the test instead of hanging the run


@dataclass
class Lanes:
    """Wraps the lanes' AES-GCM call: records (epoch, counter, authentic) per message, in call order;
    `hold(counter, until)` holds that message's lane until `until()` (3 s at most); `fail(counter)`
    raises in that message's lane instead of opening it."""

    opened: list[tuple[int, int, bool]] = field(default_factory=list)
    held: dict[int, Callable[[], bool]] = field(default_factory=dict)
    failing: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    hold_met: bool = False

    def counters(self, epoch: int = 0, *, authentic: bool = True) -> list[int]:
        with self.lock:
            return [c for e, c, ok in self.opened if e == epoch and ok == authentic]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = ReceiverChannel.open

        def wrapped(receiver: ReceiverChannel, message: TakenMessage) -> memoryview:
            if threading.current_thread().name.endswith("copy-engine"):  # the device opening h2d
                return real(receiver, message)
            until = self.held.get(message.counter)
            if until is not None:
                for _ in range(3000):
                    if until():
                        self.hold_met = True
                        break
                    threading.Event().wait(0.001)
            if message.counter in self.failing:
                raise RuntimeError("injected lane failure")
            try:
                plaintext = real(receiver, message)
            except IntegrityError:
                self._record(message, authentic=False)
                raise
            self._record(message, authentic=True)
            return plaintext

        monkeypatch.setattr(ReceiverChannel, "open", wrapped)

    def _record(self, message: TakenMessage, *, authentic: bool) -> None:
        with self.lock:
            self.opened.append((message.keys.epoch, message.counter, authentic))


@pytest.fixture
def lanes(monkeypatch: pytest.MonkeyPatch) -> Lanes:
    recorder = Lanes()
    recorder.install(monkeypatch)
    return recorder


@pytest.fixture
def device() -> Iterator[Device]:
    with Device(capacity_bytes=16 << 20) as dev:
        yield dev


@dataclass
class Queued:
    """`count` device-to-host transfers of `chunks` messages each, from one device buffer."""

    source: torch.Tensor
    destinations: list[HostBuffer]
    events: list[object]
    chunks: int

    def expected(self, i: int) -> torch.Tensor:
        size = self.chunks * CHUNK
        return self.source[i * size : (i + 1) * size]


def _queue(
    transport: PipeLLMTransport, on_device: DeviceBuffer, source: torch.Tensor, count: int, chunks: int
) -> Queued:
    size = chunks * CHUNK
    destinations = [HostBuffer(torch.full((size,), FILL, dtype=torch.uint8)) for _ in range(count)]
    events = [
        transport.d2h(on_device, d, src_offset=i * size, nbytes=size) for i, d in enumerate(destinations)
    ]
    return Queued(source, destinations, events, chunks)


@contextmanager
def _held_ring(transport: PipeLLMTransport) -> Iterator[deque[Descriptor]]:
    """Hold the device-to-host ring (no lane takes a message); yield its pending descriptors, which
    the caller waits for and edits as an attacker on the bus would."""
    with transport.link.d2h_ring.tap() as tap:
        yield tap.pending


def _wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(5000):
        if condition():
            return
        threading.Event().wait(0.001)
    raise AssertionError("condition not met in 5 s")


def _check(
    queued: Queued, transport: PipeLLMTransport, first_failed: int, error: type[BaseException]
) -> None:
    """Transfers before `first_failed` landed; it raises `error`; every later one raises IntegrityError;
    no failed transfer wrote a single byte of its destination."""
    for i, destination in enumerate(queued.destinations):
        if i < first_failed:
            transport.ensure_host_ready(destination)
            assert torch.equal(destination.tensor, queued.expected(i)), f"transfer {i}"
            continue
        with pytest.raises(error if i == first_failed else IntegrityError):
            transport.ensure_host_ready(destination)
        assert bool((destination.tensor == FILL).all()), f"failed transfer {i} wrote its destination"
        assert not destination.writing  # no longer pending: released, unwritten


def _pipellm(**overrides: object) -> PipeLLMOptions:
    return options(decrypt_threads=LANES, **overrides)


def _recover(transport: PipeLLMTransport, on_device: DeviceBuffer, source: torch.Tensor) -> None:
    """After a re-key the lanes open again (none of them died)."""
    transport.rekey()
    queued = _queue(transport, on_device, source, 8, 1)
    _check(queued, transport, len(queued.destinations), IntegrityError)


def test_tampered_chunk_mid_queue_fails_it_and_every_later_transfer_even_if_opened_first(
    device: Device, lanes: Lanes
) -> None:
    count, chunks, victim = 10, 2, 4
    source = torch.randint(0, 256, (count * chunks * CHUNK,), dtype=torch.uint8)
    with PipeLLMTransport(device, SMALL_LINK, _pipellm()) as transport:
        on_device = transport.upload(source)
        later = range((victim + 1) * chunks, (victim + LANES) * chunks)  # what the other 3 lanes open
        lanes.held[victim * chunks + 1] = lambda: set(later) <= set(lanes.counters())
        with _held_ring(transport) as pending:
            queued = _queue(transport, on_device, source, count, chunks)
            _wait_for(lambda: len(pending) == count * chunks)
            bad = pending[victim * chunks + 1]  # the victim's second chunk: its first authenticates
            ring = transport.link.d2h_ring
            ring.slot(bad.slot)[7] ^= 1
        _check(queued, transport, victim, IntegrityError)
        assert lanes.hold_met, "later transfers had authenticated before the victim failed"
        assert transport.link.poisoned and transport.stats().sealed.integrity_failures >= 1
        _recover(transport, on_device, source)


@pytest.mark.parametrize("attack", ["drop", "reorder", "replay", "truncate"])
def test_ring_attacks_with_lanes_fail_from_the_first_message_moved(
    device: Device, lanes: Lanes, attack: str
) -> None:
    """Counters are the receiver's, fixed in ring order: moving any message breaks its transfer."""
    count, chunks, victim = 8, 2, 3
    at = victim * chunks + 1
    source = torch.randint(0, 256, (count * chunks * CHUNK,), dtype=torch.uint8)
    with PipeLLMTransport(device, SMALL_LINK, _pipellm()) as transport:
        on_device = transport.upload(source)
        with _held_ring(transport) as pending:
            queued = _queue(transport, on_device, source, count, chunks)
            _wait_for(lambda: len(pending) == count * chunks)
            if attack == "drop":
                del pending[at]
            elif attack == "reorder":
                pending[at], pending[at + 3] = pending[at + 3], pending[at]
            elif attack == "truncate":
                pending[at] = Descriptor(pending[at].slot, pending[at].length - 1)
            else:  # replay an earlier, authentic message in place of the victim's
                pending[at] = pending[at - 2]
        _check(queued, transport, victim, IntegrityError)
        opened = lanes.counters()  # later transfers may have authenticated too (and not landed)
        assert len(opened) == len(set(opened)) and set(range(at)) <= set(opened) and at not in opened
        _recover(transport, on_device, source)


def test_exception_in_a_lane_fails_closed_and_the_lanes_survive(device: Device, lanes: Lanes) -> None:
    count, chunks, victim = 6, 2, 2
    source = torch.randint(0, 256, (count * chunks * CHUNK,), dtype=torch.uint8)
    lanes.failing.add(victim * chunks)
    with PipeLLMTransport(device, SMALL_LINK, _pipellm()) as transport:
        on_device = transport.upload(source)
        with _held_ring(transport) as pending:
            queued = _queue(transport, on_device, source, count, chunks)
            _wait_for(lambda: len(pending) == count * chunks)
        _check(queued, transport, victim, RuntimeError)
        assert transport.link.poisoned  # fail closed: nothing opens until a re-key
        with pytest.raises(IntegrityError):
            transport.d2h(on_device, HostBuffer.empty((CHUNK,), torch.uint8), nbytes=CHUNK)
        lanes.failing.clear()
        _recover(transport, on_device, source)


def test_few_slots_concurrent_readers_and_lanes(device: Device, lanes: Lanes) -> None:
    """Two ring slots, 4 lanes and two readers forcing from the far end: every transfer lands, each
    counter is opened exactly once, nothing deadlocks."""
    count, chunks = 24, 3
    link = TransportOptions(link=LinkConfig(chunk_bytes=CHUNK, ring_slots=2))
    source = torch.randint(0, 256, (count * chunks * CHUNK,), dtype=torch.uint8)
    with PipeLLMTransport(device, link, _pipellm()) as transport:
        on_device = transport.upload(source)
        queued = _queue(transport, on_device, source, count, chunks)
        readers = [
            threading.Thread(target=lambda order=order: [transport.ensure_host_ready(d) for d in order])
            for order in (queued.destinations[::-1], queued.destinations[::-3])
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=20)
            assert not reader.is_alive(), "deadlock"
        _check(queued, transport, count, IntegrityError)
        assert sorted(lanes.counters()) == list(range(count * chunks))
        assert transport.link.host_rx.counter == count * chunks


def test_rekey_while_lanes_are_busy_opens_each_epoch_under_its_own_keys(device: Device, lanes: Lanes) -> None:
    count, chunks = 16, 2
    source = torch.randint(0, 256, (count * chunks * CHUNK,), dtype=torch.uint8)
    with PipeLLMTransport(device, SMALL_LINK, _pipellm()) as transport:
        on_device = transport.upload(source)
        until = time.monotonic() + 0.3
        lanes.held[0] = lambda: time.monotonic() > until  # transfer 0 opens late: the rest queue up
        old = _queue(transport, on_device, source, count, chunks)
        assert not old.events[-1].query()
        transport.rekey()  # while the lanes are still opening epoch 0
        with lanes.lock:
            opened_before_rekey = len(lanes.opened)
        new = _queue(transport, on_device, source, count, chunks)
        _check(old, transport, count, IntegrityError)
        _check(new, transport, count, IntegrityError)
    assert opened_before_rekey == count * chunks  # every epoch-0 message was opened before the re-key
    assert sorted(lanes.counters(0)) == list(range(count * chunks))
    assert sorted(lanes.counters(1)) == list(range(count * chunks))
    assert lanes.counters(0, authentic=False) == lanes.counters(1, authentic=False) == []


def test_decrypt_threads_option() -> None:
    assert PipeLLMOptions().decrypt_threads == default_decrypt_threads() >= 1
    for bad in (0, -1, 65):
        with pytest.raises(ValueError, match=r"decrypt_threads must be in \[1, 64\]"):
            PipeLLMOptions(decrypt_threads=bad)
    for bad in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="decrypt_threads must be an int"):
            PipeLLMOptions(decrypt_threads=bad)  # type: ignore[arg-type]
