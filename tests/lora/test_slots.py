"""SlotTable: LRU eviction that never touches a pinned adapter, and "not now" when every slot is pinned."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.lora import Placement, SlotTable


def test_free_slots_first_then_least_recently_used() -> None:
    table = SlotTable(2)
    assert table.acquire("a") == Placement(0, load=True)
    assert table.acquire("b") == Placement(1, load=True)
    table.release("a")
    table.release("b")
    assert table.acquire("a") == Placement(0, load=False)  # resident: no load, now most recent
    table.release("a")
    assert table.acquire("c") == Placement(1, load=True, evicted="b")
    assert table.resident() == {"a": 0, "c": 1}


def test_every_slot_pinned_means_not_now() -> None:
    table = SlotTable(2)
    table.acquire("a")
    table.acquire("b")
    assert table.acquire("c") is None
    assert table.resident() == {"a": 0, "b": 1}  # a refusal changes nothing
    assert table.acquire("a") == Placement(0, load=False)  # a resident one is still granted
    table.release("b")
    assert table.acquire("c") == Placement(1, load=True, evicted="b")


def test_pins_count() -> None:
    table = SlotTable(1)
    table.acquire("a")
    table.acquire("a")
    table.release("a")
    assert table.acquire("b") is None  # one holder left
    table.release("a")
    assert table.acquire("b") == Placement(0, load=True, evicted="a")


def test_misuse() -> None:
    with pytest.raises(ValueError, match="num_slots must be >= 1"):
        SlotTable(0)
    with pytest.raises(ValueError, match="not pinned"):
        SlotTable(1).release("a")


def test_discard_frees_the_slot() -> None:
    table = SlotTable(1)
    table.acquire("a")
    table.discard("a")
    assert table.pins("a") == 0 and table.slot_of("a") is None
    assert table.acquire("b") == Placement(0, load=True)


ops = st.lists(
    st.tuples(st.sampled_from(["acquire", "release", "discard"]), st.sampled_from("abcdefg")), max_size=80
)


@settings(max_examples=200, deadline=None)
@given(num_slots=st.integers(1, 4), steps=ops)
def test_random_sequences_keep_the_invariants(num_slots: int, steps: list[tuple[str, str]]) -> None:
    table = SlotTable(num_slots)
    pins: dict[str, int] = {}  # the model: holders of each adapter
    for op, name in steps:
        before = table.resident()
        if op == "acquire":
            placement = table.acquire(name)
            pinned = {n for n, k in pins.items() if k}
            if placement is None:
                assert name not in before and len(before) == num_slots and pinned >= set(before)
                assert table.resident() == before
                continue
            assert placement.load == (name not in before)
            assert placement.evicted is None or placement.evicted not in pinned  # never a pinned one
            assert placement.evicted is None or len(before) == num_slots  # evict only when full
            pins[name] = pins.get(name, 0) + 1
        elif op == "release":
            if not pins.get(name):
                with pytest.raises(ValueError):
                    table.release(name)
                continue
            table.release(name)
            pins[name] -= 1
        else:
            table.discard(name)
            pins.pop(name, None)
        resident = table.resident()
        assert len(resident) <= num_slots
        assert len(set(resident.values())) == len(resident)  # one adapter per slot
        assert all(0 <= s < num_slots for s in resident.values())
        assert all(n in resident for n, k in pins.items() if k)  # pinned means resident
        assert all(table.pins(n) == pins.get(n, 0) for n in "abcdefg")
        assert all(before[n] == resident[n] for n in before if n in resident)  # nothing moves slot
