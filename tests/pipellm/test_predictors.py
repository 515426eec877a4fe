"""Predictors: cyclic period detection, swap order, adapter queue, hints, composite."""

from __future__ import annotations

import random

import pytest

from veil.pipellm import (
    CompositePredictor,
    CyclicPredictor,
    Direction,
    HintPredictor,
    QueuePredictor,
    SizeClass,
    SizeClasses,
    SwapPredictor,
    TransferKey,
    default_predictor,
)

MB = 1 << 20


def k(source: int, offset: int = 0, length: int = MB, direction: Direction = Direction.H2D) -> TransferKey:
    return TransferKey(source, offset, length, direction)


def out(source: int, offset: int = 0) -> TransferKey:
    return k(source, offset, direction=Direction.D2H)


@pytest.mark.parametrize("period", [1, 7, 300])
def test_cyclic_learns_period(period: int) -> None:
    pattern = [k(i) for i in range(period)]
    p = CyclicPredictor(max_period=512)
    for key in pattern * 2:
        p.observe(key)
    assert p.period == period
    assert p.predict(period + 3) == (pattern * 4)[: period + 3]


def test_cyclic_pattern_with_repeated_keys_inside_a_period() -> None:
    pattern = [k(0), k(1), k(0), k(2), k(2), k(3), k(0)]  # period 7, keys repeat within it
    p = CyclicPredictor()
    for key in pattern * 3:
        p.observe(key)
    assert p.period == 7
    assert p.predict(7) == pattern


def test_cyclic_relearns_when_the_pattern_changes() -> None:
    p = CyclicPredictor()
    for key in [k(i) for i in range(5)] * 3:
        p.observe(key)
    assert p.period == 5
    new = [k(100 + i) for i in range(9)]
    for key in new * 2:
        p.observe(key)
    assert p.period == 9
    assert p.predict(9) == new


def test_cyclic_recovers_from_one_spurious_transfer() -> None:
    pattern = [k(i) for i in range(20)]
    p = CyclicPredictor()
    for key in pattern * 2 + [k(99)] + pattern * 2:
        p.observe(key)
    # Right after the insertion, a period that spans it fits the recent history best; one more
    # misprediction, where the spurious key is absent, brings the true period back.
    assert p.period == 41
    for key in pattern:
        p.observe(key)
    assert p.period == 20
    assert p.predict(5) == pattern[:5]


def test_cyclic_predicts_nothing_without_a_pattern_and_ignores_other_direction() -> None:
    p = CyclicPredictor()
    for i in range(50):
        p.observe(k(i))
        p.observe(out(1))
    assert p.period is None and p.predict(4) == []


def test_cyclic_memory_stays_bounded_on_a_stream_of_new_keys() -> None:
    p = CyclicPredictor(max_period=16)
    for i in range(5000):
        p.observe(k(i))
    assert len(p._seen) <= 4 * (16 + 16 + 1)


def test_swap_groups_come_back_oldest_first_and_fifo_within() -> None:
    """As veil's scheduler brings swapped requests back: the oldest first, each block by block."""
    p = SwapPredictor()
    a = [out(1, i) for i in range(3)]
    b = [out(2, i) for i in range(2)]
    for key in a:
        p.observe(key)
    p.observe(k(50))  # any host-to-device transfer closes the group
    for key in b:
        p.observe(key)
    want = [x.mirrored() for x in a + b]
    assert p.predict(10) == want and p.peek() == want[0]
    p.observe(want[0])
    assert p.predict(10) == want[1:]
    p.observe(want[3])  # consumes from the newer group; the older group's rest stays first
    assert p.predict(10) == [want[1], want[2], want[4]]


def test_swap_explicit_group_boundary_and_rewrite() -> None:
    p = SwapPredictor()
    p.observe(out(1))
    p.new_group()
    p.observe(out(2))
    p.observe(out(1))  # the same host range swapped out again: it returns with the newest group
    assert p.predict(5) == [out(2).mirrored(), out(1).mirrored()]


class _SwapReference:
    """The swap rule written as plainly as possible (lists, full scans): the oracle for its index."""

    def __init__(self, max_groups: int) -> None:
        self.groups: list[list[TransferKey]] = []
        self.open = False
        self.max_groups = max_groups

    def observe(self, key: TransferKey) -> None:
        if key.direction is Direction.D2H:
            swap_in = key.mirrored()
            for group in self.groups:
                if swap_in in group:
                    group.remove(swap_in)
            if self.groups and not self.groups[-1]:
                self.groups.pop()
                self.open = False
            self.groups = [g for g in self.groups if g]
            if not self.open or not self.groups:
                self.groups.append([])
                self.open = True
                self.groups = self.groups[-self.max_groups :]
            self.groups[-1].append(swap_in)
            return
        self.open = False
        for group in reversed(self.groups):
            if key in group:
                del group[: group.index(key) + 1]
                break
        self.groups = [g for g in self.groups if g]

    def predict(self) -> list[TransferKey]:
        return [key for group in self.groups for key in group]  # the oldest group first


@pytest.mark.parametrize("seed", range(20))
def test_swap_predictor_equals_the_plain_rule_on_random_traffic(seed: int) -> None:
    rng = random.Random(seed)
    p, reference = SwapPredictor(max_groups=3), _SwapReference(max_groups=3)
    for _ in range(300):
        block = rng.randrange(12)
        action = rng.random()
        if action < 0.45:
            key = out(block)
        elif action < 0.9:
            key = out(block).mirrored()  # a swap-in (or another host-to-device transfer)
        else:
            p.new_group()
            reference.open = False
            continue
        p.observe(key)
        reference.observe(key)
        assert p.predict(100) == reference.predict()
        assert p._held == set(reference.predict())  # the index holds exactly the keys in groups


def test_queue_predicts_waiting_adapters_in_order() -> None:
    p = QueuePredictor()
    assert p.predict(4) == []  # no engine information: nothing to predict
    chunks = {a: [k(10 + a, i) for i in range(2)] for a in range(3)}
    for a, keys in chunks.items():
        p.register(a, keys)
    p.set_waiting([2, 0, 2, 1])
    p.set_resident([0])
    assert p.predict(10) == chunks[2] + chunks[1]
    p.observe(chunks[2][0])
    assert p.predict(1) == [chunks[2][1]]
    p.observe(chunks[2][1])
    assert p.predict(10) == chunks[1]
    with pytest.raises(ValueError):
        p.set_waiting([7])


def test_hints_are_consumed_in_order() -> None:
    p = HintPredictor()
    keys = [k(i) for i in range(4)]
    p.hint(keys)
    p.observe(k(99))  # unrelated: hints stay
    assert p.predict(2) == keys[:2]
    p.observe(keys[1])  # skipping consumes the earlier hint too
    assert p.predict(5) == keys[2:]


def test_composite_follows_the_predictor_that_is_right() -> None:
    hints, cyclic = HintPredictor(), CyclicPredictor()
    c = CompositePredictor([hints, cyclic])
    pattern = [k(i) for i in range(4)]
    for key in pattern * 3:
        c.observe(key)
    assert c.predict(4) == pattern
    c.hint([k(40), k(41)])
    c.observe(k(40))  # hints right, cyclic wrong
    assert c.predict(1) == [k(41)]
    assert c.streaks[0] >= 1 and c.streaks[1] == 0


def test_composite_repeats_the_leaders_period_past_one_period() -> None:
    """FlexGen-like: weights and hidden states cycle up; the q, K, V of attention go down and never
    come back. Their swap-outs must neither reset the cyclic predictor's lead nor, past one period,
    fill the window with swap-ins that never come (the default's hint child, first and empty, made
    the cyclic child's repeats look like duplicates)."""
    p = default_predictor()
    cycle = [k(0, length=8 * MB), k(10), k(11)]
    for _ in range(4):
        for key in cycle:
            p.observe(key)
            p.observe(out(20 + key.source_id))  # a swap-out that is never swapped in
    assert p.streaks[1] > 0  # the device-to-host observations scored no one
    assert p.predict(7) == cycle * 2 + [cycle[0]]


def test_default_predictor_works_without_hints() -> None:
    p = default_predictor()
    for key in [k(i) for i in range(3)] * 3:
        p.observe(key)
    assert p.predict(3) == [k(0), k(1), k(2)]


@pytest.mark.parametrize(
    ("length", "cls"),
    [
        (0, SizeClass.CONTROL),
        (8191, SizeClass.CONTROL),
        (8192, SizeClass.MEDIUM),
        (131072, SizeClass.MEDIUM),
        (131073, SizeClass.BULK),
    ],
)
def test_size_classes(length: int, cls: SizeClass) -> None:
    assert SizeClasses().classify(length) is cls


def test_key_and_threshold_validation() -> None:
    with pytest.raises(ValueError):
        TransferKey(-1, 0, 1)
    with pytest.raises(ValueError):
        SizeClasses(control_below=10, bulk_above=5)
    assert not SizeClasses().speculative(out(1))
