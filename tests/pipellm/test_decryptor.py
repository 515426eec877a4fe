"""The decryptor (asynchronous device-to-host decryption, force-on-touch) and its lifecycle."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from veil.cc.device import Device
from veil.cc.errors import IntegrityError
from veil.cc.host import HostBuffer
from veil.pipellm.decryptor import Decryptor
from veil.transport.pipellm import PipeLLMTransport

from .support import CHUNK, SMALL_LINK, options


@pytest.fixture
def device() -> Iterator[Device]:
    with Device(capacity_bytes=16 << 20) as dev:
        yield dev


class Recorded:
    """An `Opening` that records its phases (thread, order) into a shared log; `open` may block on a
    gate or raise, to play a slow or failing lane."""

    def __init__(
        self,
        i: int,
        log: list[tuple[str, int, str]],
        gate: threading.Event | None = None,
        fail: BaseException | None = None,
    ) -> None:
        self.i, self.log, self.gate, self.fail = i, log, gate, fail
        self.committed = False

    def _note(self, phase: str) -> None:
        self.log.append((phase, self.i, threading.current_thread().name))

    def take(self) -> None:
        self._note("take")

    def open(self) -> None:
        if self.gate is not None:
            assert self.gate.wait(timeout=5)
        self._note("open")
        if self.fail is not None:
            raise self.fail

    def commit(self) -> None:
        self.committed = True
        self._note("commit")

    def finish(self, error: BaseException | None) -> BaseException | None:
        self._note("finish")
        return error


def _phase(log: list[tuple[str, int, str]], phase: str) -> list[int]:
    return [i for p, i, _ in log if p == phase]


def test_decryptor_runs_in_order_and_forcing_runs_in_the_reader() -> None:
    log: list[tuple[str, int, str]] = []
    with Decryptor("lazy", lanes=0) as decryptor:
        events = [decryptor.submit(Recorded(i, log)) for i in range(4)]
        assert not any(e.query() for e in events)
        events[2].wait()  # forces 0, 1, 2 in this thread, in order
        assert _phase(log, "commit") == [0, 1, 2]
        assert all(name == threading.current_thread().name for _, _, name in log)
        assert events[2].forced and decryptor.forced == 3 and not events[3].query()
    assert _phase(log, "commit") == [0, 1, 2, 3]  # close drains


def test_lanes_open_in_parallel_but_commit_in_order() -> None:
    """The first transfer opens last (its lane is held on a gate): every later one has opened by
    then, in parallel, and still none of them commits before it."""
    log: list[tuple[str, int, str]] = []
    gate = threading.Event()
    with Decryptor("pool", lanes=4) as decryptor:
        first = decryptor.submit(Recorded(0, log, gate=gate))
        rest = [decryptor.submit(Recorded(i, log)) for i in (1, 2, 3)]
        while len(_phase(log, "open")) < 3:
            threading.Event().wait(0.001)
        assert _phase(log, "commit") == [] and not any(e.query() for e in rest)
        gate.set()
        for event in (first, *rest):
            event.wait(timeout=5)
    assert _phase(log, "open")[-1] == 0 and _phase(log, "commit") == [0, 1, 2, 3]
    assert _phase(log, "take") == [0, 1, 2, 3]
    assert len({name for p, _, name in log if p == "open"}) == 4  # four lanes


@pytest.mark.parametrize("error", [IntegrityError(), RuntimeError("injected lane failure")])
def test_a_failure_fails_every_later_transfer_even_those_already_opened(error: BaseException) -> None:
    log: list[tuple[str, int, str]] = []
    gate = threading.Event()
    with Decryptor("pool", lanes=4) as decryptor:
        openings = [Recorded(0, log), Recorded(1, log, gate=gate, fail=error)]
        openings += [Recorded(i, log) for i in (2, 3, 4, 5)]
        events = [decryptor.submit(o) for o in openings]
        while len(_phase(log, "open")) < 3:  # 0 and at least two after the failing one opened first
            threading.Event().wait(0.001)
        gate.set()
        events[0].wait(timeout=5)
        with pytest.raises(type(error)):
            events[1].wait(timeout=5)
        for event in events[2:]:
            with pytest.raises(IntegrityError):
                event.wait(timeout=5)
        assert [o.committed for o in openings] == [True] + [False] * 5
        assert _phase(log, "finish") == [0, 1, 2, 3, 4, 5]  # every destination is released, in order
        with pytest.raises(IntegrityError):  # still failed: nothing opens until a re-key resets it
            decryptor.submit(Recorded(6, log)).wait(timeout=5)
        decryptor.reset()
        decryptor.submit(Recorded(7, log)).wait(timeout=5)
        assert _phase(log, "commit") == [0, 7]


def test_concurrent_forcing_readers_and_lanes_never_deadlock() -> None:
    log: list[tuple[str, int, str]] = []
    with Decryptor("pool", lanes=2) as decryptor:
        events = [decryptor.submit(Recorded(i, log)) for i in range(200)]
        readers = [threading.Thread(target=events[i].wait, args=(5,)) for i in range(199, 0, -7)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=10)
            assert not reader.is_alive()
        decryptor.drain()
        assert all(e.query() and e.error is None for e in events)
    assert _phase(log, "take") == _phase(log, "commit") == list(range(200))


def test_decryptor_errors_and_lifecycle() -> None:
    with pytest.raises(ValueError, match="lanes must be >= 0"):
        Decryptor(lanes=-1)
    with Decryptor("eager") as decryptor:
        with pytest.raises(TypeError, match="an Opening"):
            decryptor.submit(lambda: None)  # type: ignore[arg-type]
        decryptor.submit(Recorded(0, [])).wait(timeout=5)
        with pytest.raises(RuntimeError, match="already started"):
            decryptor.__enter__()
    with pytest.raises(RuntimeError, match="not running"):
        decryptor.submit(Recorded(1, []))
    decryptor.close()  # idempotent


def test_tampered_d2h_is_refused_on_touch_and_leaves_the_buffer(device: Device) -> None:
    source = torch.randint(0, 256, (3 * CHUNK,), dtype=torch.uint8)
    with PipeLLMTransport(device, SMALL_LINK, options()) as transport:
        on_device = transport.upload(source)
        destination = HostBuffer(torch.full((3 * CHUNK,), 7, dtype=torch.uint8))
        with transport.link.d2h_ring.tap() as tap:
            transport._decryptor._take_lock.acquire()  # nothing opens before the attack
            try:
                event = transport.d2h(on_device, destination)
            finally:
                transport._decryptor._take_lock.release()
            while len(tap.pending) < 3:
                threading.Event().wait(0.001)
            victim = tap.pending[1]
            tap.write(victim.slot, 0, bytes([tap.read(victim)[0] ^ 1]))
        for _ in range(2):
            with pytest.raises(IntegrityError):
                transport.ensure_host_ready(destination)
        with pytest.raises(IntegrityError):
            event.wait()
        assert torch.equal(destination.tensor[CHUNK:], torch.full((2 * CHUNK,), 7, dtype=torch.uint8))
        with pytest.raises(IntegrityError):
            transport.synchronize()
        transport.rekey()
        transport.h2d(HostBuffer(source.clone()), on_device).wait()
        assert torch.equal(transport.download(on_device), source)


def test_synchronous_d2h_option(device: Device) -> None:
    source = torch.randint(0, 256, (2 * CHUNK + 5,), dtype=torch.uint8)
    with PipeLLMTransport(device, SMALL_LINK, options(async_d2h=False)) as transport:
        on_device = transport.upload(source)
        destination = HostBuffer.empty((2 * CHUNK + 5,), torch.uint8)
        event = transport.d2h(on_device, destination)
        assert event.query() and not transport.pending(destination)
        assert torch.equal(destination.tensor, source) and transport.stats().pipellm.d2h_async == 0
