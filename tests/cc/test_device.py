"""The emulated device: arena capacity, lifecycle, streams and events, worker errors."""

from __future__ import annotations

import threading

import pytest
import torch

from veil.cc.device import Device
from veil.cc.errors import DeviceOutOfMemory
from veil.cc.stream import Event


def test_out_of_memory_and_free_returns_capacity(device: Device) -> None:
    small = Device(capacity_bytes=1000)
    first = small.alloc(600)
    with pytest.raises(DeviceOutOfMemory, match="cannot allocate 500 bytes: 400 of 1000 free"):
        small.alloc(500)
    first.free()
    first.free()  # idempotent
    assert small.free_bytes == 1000
    typed = small.empty((10, 25), torch.float32)
    assert typed.nbytes == 1000 and typed.tensor.shape == (10, 25) and small.free_bytes == 0
    with pytest.raises(RuntimeError, match="freed"):
        _ = first.tensor


def test_device_must_be_started_and_stops_its_threads() -> None:
    dev = Device(capacity_bytes=0)
    with pytest.raises(RuntimeError, match="not started"):
        _ = dev.copy_engine
    before = threading.active_count()
    with dev:
        dev.new_stream("compute")
        assert threading.active_count() == before + 2
    assert threading.active_count() == before


def test_worker_errors_reach_the_caller(device: Device) -> None:
    def fail() -> None:
        raise ZeroDivisionError("in the copy engine")

    event = device.copy_engine.submit(fail)
    with pytest.raises(ZeroDivisionError):
        event.wait(5)
    with pytest.raises(ZeroDivisionError):
        device.synchronize()
    device.synchronize()  # reported once


def test_stream_waits_for_an_event_of_another_stream(device: Device) -> None:
    compute = device.new_stream("compute")
    gate, order = threading.Event(), []
    produced = compute.submit(lambda: (gate.wait(5), order.append("compute")))
    device.copy_engine.wait_event(produced)
    copied = device.copy_engine.submit(lambda: order.append("copy"))
    assert not copied.query()
    gate.set()
    copied.wait(5)
    assert order == ["compute", "copy"]


def test_event_timeout_and_completed() -> None:
    with pytest.raises(TimeoutError):
        Event().wait(0.01)
    assert Event.completed().query()


def test_freed_blocks_are_reused_and_the_cache_never_exceeds_capacity() -> None:
    with Device(capacity_bytes=10_000) as device:
        first = device.alloc(4000)
        ptr = first.bytes.data_ptr()
        first.free()
        again = device.alloc(4000)
        assert again.bytes.data_ptr() == ptr  # reused, like a caching allocator
        other = device.alloc(6000)  # live 10000: the cache must not hold more on top
        assert device.allocated_bytes == 10_000 and device._cached_bytes == 0
        again.free()
        other.free()
        assert device.allocated_bytes == 0 and device._cached_bytes <= 10_000
        big = device.alloc(10_000)  # a size never cached: the cache is evicted to make room
        assert device._cached_bytes + device.allocated_bytes <= 10_000
        big.free()
