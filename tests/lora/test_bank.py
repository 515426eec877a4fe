"""The device bank beside the slot table: identical bytes over every transport, deferral, hints, errors."""

from __future__ import annotations

import time

import pytest
import torch

from veil.cc.errors import IntegrityError
from veil.cc.stream import Event
from veil.lora import AdapterError, DeviceAdapterBank, SlotTable, random_adapter
from veil.pipellm import SizeClasses
from veil.pipellm.governor import GovernorConfig
from veil.pipellm.options import PipeLLMOptions
from veil.transport import TransportKind

from .support import bank_on, tiny_pair

_, MODEL = tiny_pair()
CONFIG = MODEL.config
ADAPTERS = {f"a{i}": random_adapter(CONFIG, rank=2 + i % 3, alpha=8, seed=i) for i in range(5)}


def acquire(table: SlotTable, bank: DeviceAdapterBank, name: str) -> int | None:
    """What an engine does when a request with adapter `name` is admitted: the policy, then the load."""
    placement = table.acquire(name)
    if placement is not None and placement.load:
        bank.load(name, placement.slot)
    return None if placement is None else placement.slot


def _device_bytes(kind: TransportKind) -> list[torch.Tensor]:
    """Slot contents after each acquire of a sequence that evicts (5 adapters, 2 slots)."""
    seen = []
    table = SlotTable(2)
    with bank_on(CONFIG, kind, num_slots=2, rank=4) as bank:
        for name, adapter in ADAPTERS.items():
            bank.add(name, adapter)
        bank.hint(list(ADAPTERS))
        for name in ["a0", "a1", "a0", "a2", "a0", "a3", "a4", "a1"]:
            slot = acquire(table, bank, name)
            assert slot is not None and bank.holds(slot) == name
            bank.batch([slot])  # waits for the load
            seen.append(bank.slot_tensor(slot).clone())
            assert torch.equal(seen[-1], bank.host_tensor(name))
            table.release(name)
        assert bank.loads == 6  # a0 was resident twice: LRU kept it
    return seen


def test_loads_through_plain_cc_pipellm_give_identical_device_bytes() -> None:
    plain, cc, pipellm = (_device_bytes(kind) for kind in TransportKind)
    for a, b, c in zip(plain, cc, pipellm, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_one_transfer_per_load() -> None:
    with bank_on(CONFIG, num_slots=2, rank=4) as bank:
        bank.add("a0", ADAPTERS["a0"])
        stats = bank.transport.stats()
        bank.load("a0", 1)
        after = bank.transport.stats()
        assert after.h2d_transfers - stats.h2d_transfers == 1
        assert after.h2d_bytes - stats.h2d_bytes == bank.slot_bytes


def test_every_slot_pinned_defers_and_release_lets_it_in() -> None:
    table = SlotTable(2)
    with bank_on(CONFIG, num_slots=2, rank=4) as bank:
        for name in ("a0", "a1", "a2"):
            bank.add(name, ADAPTERS[name])
        assert acquire(table, bank, "a0") == 0 and acquire(table, bank, "a1") == 1
        assert acquire(table, bank, "a2") is None  # not now: the scheduler defers this request
        assert bank.loads == 2
        table.release("a0")
        assert acquire(table, bank, "a2") == 0
        assert (bank.holds(0), bank.holds(1)) == ("a2", "a1")


def test_misuse() -> None:
    with bank_on(CONFIG, num_slots=2, rank=2, targets=("q_proj", "v_proj")) as bank:
        with pytest.raises(AdapterError, match="rank 4 exceeds the bank's maximum rank 2"):
            bank.add("big", ADAPTERS["a2"])
        with pytest.raises(AdapterError, match="not among the bank's targets"):
            bank.add("all", random_adapter(CONFIG, rank=2, alpha=2, seed=0))
        bank.add("qv", random_adapter(CONFIG, rank=2, alpha=2, targets=("v_proj",), seed=0))
        with pytest.raises(ValueError, match="already registered"):
            bank.add("qv", random_adapter(CONFIG, rank=2, alpha=2, targets=("v_proj",), seed=0))
        with pytest.raises(KeyError):
            bank.load("nope", 0)
        with pytest.raises(ValueError, match="slot 2 out of range"):
            bank.load("qv", 2)
        with pytest.raises(ValueError, match="slot 1 holds no adapter"):
            bank.batch([None, 1])
    with pytest.raises(ValueError, match="num_slots must be >= 1"), bank_on(CONFIG, num_slots=0):
        pass


def test_hints_reach_pipellm_and_its_loads_hit() -> None:
    """Hinted adapters are sealed ahead; their loads commit the pre-sealed chunks (no sealing on the spot).

    The tiny model's slots are 44 KiB, a MEDIUM transfer that PipeLLM does not speculate by default
    (real adapters are MiBs, BULK), so every chunk is made BULK here. Speculation is pinned on: the
    governor would seal in the caller until a probe of speculation won, after a window of traffic."""
    bulk = PipeLLMOptions(
        sizes=SizeClasses(control_below=1, bulk_above=0), governor=GovernorConfig(enabled=False)
    )
    with bank_on(CONFIG, TransportKind.PIPELLM, num_slots=3, rank=4, pipellm=bulk) as bank:
        for name in ("a0", "a1", "a2"):
            bank.add(name, ADAPTERS[name])
        bank.load("a2", 2)  # unhinted: sealed on the spot (a miss)
        bank.batch([2])
        before = bank.transport.stats().pipellm.speculator
        bank.hint(["a2", "a0", "a1"])  # a2 is resident: no hint for it
        deadline = time.monotonic() + 20
        while bank.transport.stats().pipellm.speculator.bytes_sealed_ahead < 2 * bank.slot_bytes:
            assert time.monotonic() < deadline, "hinted adapters were not sealed ahead in time"
            time.sleep(0.001)
        bank.load("a0", 0)
        bank.load("a1", 1)
        bank.batch([0, 1])
        speculator = bank.transport.stats().pipellm.speculator
        assert speculator.hits - before.hits == 2 and speculator.misses == before.misses
        assert speculator.bytes_committed - before.bytes_committed == 2 * bank.slot_bytes


def test_bank_takes_what_device_bytes_says() -> None:
    want = DeviceAdapterBank.device_bytes(CONFIG, num_slots=3, rank=4)
    with bank_on(CONFIG, num_slots=3, rank=4) as bank:
        assert bank.transport.device.allocated_bytes == want == 3 * bank.slot_bytes
        device = bank.transport.device
    assert device.allocated_bytes == 0  # closing the bank freed its slots


def test_a_failed_load_leaves_the_slot_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    with bank_on(CONFIG, num_slots=1, rank=4) as bank:
        bank.add("a0", ADAPTERS["a0"])
        bank.add("a1", ADAPTERS["a1"])
        with monkeypatch.context() as patch:
            patch.setattr(bank.transport, "h2d", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bus")))
            with pytest.raises(RuntimeError, match="bus"):
                bank.load("a0", 0)
        assert bank.holds(0) is None
        with monkeypatch.context() as patch:
            patch.setattr(bank.transport, "h2d", lambda *a, **k: Event.completed(IntegrityError()))
            bank.load("a1", 0)  # the device's half fails later: seen when a batch waits for it
            with pytest.raises(IntegrityError):
                bank.batch([0])
        assert bank.holds(0) is None
        bank.load("a0", 0)
        bank.batch([0])
        assert torch.equal(bank.slot_tensor(0), bank.host_tensor("a0"))
