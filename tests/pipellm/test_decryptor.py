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


def test_decryptor_runs_in_order_and_forcing_runs_in_the_reader() -> None:
    order: list[tuple[int, str]] = []

    def job(i: int) -> None:
        order.append((i, threading.current_thread().name))

    with Decryptor("lazy", background=False) as decryptor:
        events = [decryptor.submit(lambda i=i: job(i)) for i in range(4)]
        assert not any(e.query() for e in events)
        events[2].wait()  # forces 0, 1, 2 in this thread, in order
        assert [i for i, _ in order] == [0, 1, 2]
        assert all(name == threading.current_thread().name for _, name in order)
        assert events[2].forced and decryptor.forced == 3 and not events[3].query()
    assert [i for i, _ in order] == [0, 1, 2, 3]  # close drains


def test_decryptor_background_and_errors() -> None:
    def boom() -> None:
        raise IntegrityError()

    with Decryptor("eager") as decryptor:
        ok = decryptor.submit(lambda: None)
        bad = decryptor.submit(boom)
        ok.wait(timeout=5)
        with pytest.raises(IntegrityError):
            bad.wait(timeout=5)
    with pytest.raises(RuntimeError, match="not running"):
        decryptor.submit(lambda: None)


def test_tampered_d2h_is_refused_on_touch_and_leaves_the_buffer(device: Device) -> None:
    source = torch.randint(0, 256, (3 * CHUNK,), dtype=torch.uint8)
    with PipeLLMTransport(device, SMALL_LINK, options()) as transport:
        on_device = transport.upload(source)
        destination = HostBuffer(torch.full((3 * CHUNK,), 7, dtype=torch.uint8))
        with transport.link.d2h_ring.tap() as tap:
            transport._decryptor._run_lock.acquire()  # nothing opens before the attack
            try:
                event = transport.d2h(on_device, destination)
            finally:
                transport._decryptor._run_lock.release()
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
