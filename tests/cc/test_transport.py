"""Transports: round trips of every dtype and awkward size, ranges, concurrency, re-keying, tampering."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from veil.cc.device import Device
from veil.cc.errors import IntegrityError, RekeyRequired
from veil.cc.host import HostBuffer, byte_view
from veil.cc.link import MIB, LinkConfig
from veil.transport import make_transport
from veil.transport.base import Transport, TransportKind, TransportOptions
from veil.transport.sealed import CcTransport

DTYPES = [
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.complex128, torch.bool, torch.float8_e4m3fn,
]  # fmt: skip
NUMELS = {"zero": 0, "one": 1, "odd": 777, "one_mib": -1, "one_mib_plus_one": -2}


def _random(numel: int, dtype: torch.dtype) -> torch.Tensor:
    raw = torch.randint(0, 256, (numel * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8)
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(byte_view(a), byte_view(b))


@pytest.fixture(scope="module")
def started() -> Iterator[Device]:
    with Device(capacity_bytes=512 << 20) as dev:
        yield dev


@pytest.fixture(scope="module", params=list(TransportKind), ids=lambda k: k.value)
def transport(request: pytest.FixtureRequest, started: Device) -> Iterator[Transport]:
    with make_transport(request.param, started) as made:
        yield made


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", NUMELS)
def test_round_trip(transport: Transport, dtype: torch.dtype, size: str) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = NUMELS[size] if NUMELS[size] >= 0 else MIB // itemsize + (NUMELS[size] == -2)
    tensor = _random(numel, dtype)
    buffer = transport.upload(tensor)
    try:
        assert _same(buffer.tensor, tensor)
        assert _same(transport.download(buffer), tensor)
    finally:
        buffer.free()


def test_one_mib_plus_one_byte_is_two_messages(started: Device) -> None:
    with CcTransport(started) as cc:
        cc.upload(_random(MIB + 1, torch.uint8)).free()
        assert cc.link.device_rx.counter == 2


def test_hundred_mib_round_trip(started: Device) -> None:
    tensor = _random(100 * MIB, torch.uint8)
    with make_transport(TransportKind.CC, started) as cc:
        buffer = cc.upload(tensor)
        assert torch.equal(buffer.tensor, tensor)
        assert torch.equal(cc.download(buffer), tensor)
        buffer.free()


def test_ranges_offsets_and_versions(transport: Transport, started: Device) -> None:
    src = HostBuffer(torch.arange(100, dtype=torch.uint8))
    dst = started.alloc(50)
    dst.bytes.zero_()
    transport.h2d(src, dst, src_offset=10, dst_offset=5, nbytes=20).wait(5)
    assert dst.bytes[5:25].tolist() == list(range(10, 30)) and dst.bytes[:5].sum() == 0
    back = HostBuffer(torch.zeros(30, dtype=torch.uint8))
    transport.d2h(dst, back, src_offset=5, dst_offset=10, nbytes=20).wait(5)
    assert back.bytes[10:30].tolist() == list(range(10, 30)) and back.version == 2
    with pytest.raises(ValueError, match="exceeds 50 bytes"):
        transport.h2d(src, dst, dst_offset=40, nbytes=20)
    with pytest.raises(ValueError, match=">= 0"):
        transport.d2h(dst, back, src_offset=-1)
    dst.free()


def test_concurrent_transfers_from_two_threads(transport: Transport) -> None:
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for step in range(6):
                tensor = _random(300_000 + seed * 1000 + step, torch.uint8)
                buffer = transport.upload(tensor)
                assert torch.equal(transport.download(buffer), tensor)
                buffer.free()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors


def test_factory_dispatches_on_the_enum_only(started: Device) -> None:
    with pytest.raises(TypeError, match="TransportKind"):
        make_transport("cc", started)  # type: ignore[arg-type]
    assert make_transport(TransportKind("plain"), started).kind is TransportKind.PLAIN


def _small_cc(device: Device, *, auto_rekey: bool) -> CcTransport:
    link = LinkConfig(chunk_bytes=1024, ring_slots=4, counter_limit=4)
    return CcTransport(device, TransportOptions(link=link, auto_rekey=auto_rekey))


def test_exhaustion_rekeys_or_refuses(started: Device) -> None:
    data = _random(3000, torch.uint8)  # three messages of an epoch's four
    with _small_cc(started, auto_rekey=True) as cc:
        for _ in range(3):
            assert torch.equal(cc.download(cc.upload(data)), data)
        assert cc.link.epoch == 2
        with pytest.raises(ValueError, match="more IVs than one epoch"):
            cc.upload(_random(5000, torch.uint8))
    with _small_cc(started, auto_rekey=False) as cc:
        cc.upload(data)
        with pytest.raises(RekeyRequired):
            cc.upload(data)
        cc.rekey()
        assert torch.equal(cc.upload(data).tensor, data)


def test_tampering_on_the_bus_poisons_the_link_until_rekey(started: Device) -> None:
    with _small_cc(started, auto_rekey=True) as cc:
        src = HostBuffer(_random(2000, torch.uint8))
        dst = started.alloc(2000)
        dst.bytes.fill_(0xA5)
        with cc.link.h2d_ring.tap() as tap:
            event = cc.h2d(src, dst)
            tap.write(tap.pending[1].slot, 7, b"\x00\x01")
        with pytest.raises(IntegrityError):
            event.wait(5)
        assert bytes(dst.bytes[1024:].numpy()) == b"\xa5" * 976  # the tampered chunk never landed
        with pytest.raises(IntegrityError, match="poisoned"):
            cc.h2d(src, dst)
        with pytest.raises(IntegrityError, match="poisoned"):
            cc.d2h(dst, src)
        assert cc.link.device_rx.stats.integrity_failures == 1
        cc.rekey()
        cc.h2d(src, dst).wait(5)
        assert torch.equal(dst.bytes, src.bytes)
        dst.free()


def test_closed_transport_refuses(started: Device) -> None:
    transport = make_transport(TransportKind.PLAIN, started)
    transport.close()
    with pytest.raises(RuntimeError, match="closed"):
        transport.upload(torch.zeros(1))
