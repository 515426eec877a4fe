"""The block manager: block tables, free counts, swap plans."""

from __future__ import annotations

import pytest

from veil.engine.block_manager import BlockManager, BlockMove, BlockPool


def manager(device: int = 4, host: int = 4, block_size: int = 4) -> BlockManager:
    return BlockManager(num_device_blocks=device, num_host_blocks=host, block_size=block_size)


@pytest.mark.parametrize(("num_tokens", "blocks"), [(0, 0), (1, 1), (4, 1), (5, 2), (16, 4)])
def test_blocks_for_rounds_up(num_tokens: int, blocks: int) -> None:
    assert manager().blocks_for(num_tokens) == blocks


def test_allocate_grows_the_table_only_when_a_block_fills() -> None:
    bm = manager()
    bm.allocate(7, 3)
    assert bm.block_table(7) == [0]
    bm.allocate(7, 4)
    assert bm.block_table(7) == [0]
    bm.allocate(7, 5)
    assert bm.block_table(7) == [0, 1]
    assert bm.device.num_free == 2


def test_can_allocate_counts_only_missing_blocks() -> None:
    bm = manager(device=2)
    bm.allocate(1, 4)
    assert bm.can_allocate(1, 8)
    assert not bm.can_allocate(1, 9)
    assert not bm.can_allocate(2, 5)


def test_free_returns_device_and_host_blocks() -> None:
    bm = manager()
    bm.allocate(1, 8)
    bm.allocate(2, 4)
    bm.swap_out(2)
    bm.free(1)
    bm.free(2)
    assert (bm.device.num_free, bm.host.num_free) == (4, 4)
    assert bm.block_table(2) == [] and bm.host_table(2) == []


def test_swap_out_then_in_plans_mirror_each_other() -> None:
    bm = manager()
    bm.allocate(1, 4)
    bm.allocate(2, 12)
    table = bm.block_table(2)
    out = bm.swap_out(2)
    assert [m.src for m in out] == table
    assert [m.dst for m in out] == bm.host_table(2)
    assert bm.device.num_free == 3 and bm.host.num_free == 1
    back = bm.swap_in(2)
    assert [m.src for m in back] == [m.dst for m in out]
    assert [m.dst for m in back] == bm.block_table(2)
    assert bm.host.num_free == 4 and bm.host_table(2) == []


def test_swap_needs_room_on_the_other_side() -> None:
    bm = manager(device=4, host=1)
    bm.allocate(1, 8)
    assert not bm.can_swap_out(1)
    bm2 = manager(device=2, host=4)
    bm2.allocate(1, 8)
    bm2.swap_out(1)
    bm2.allocate(2, 4)
    assert not bm2.can_swap_in(1, 8)
    bm2.free(2)
    assert bm2.can_swap_in(1, 8)
    assert not bm2.can_swap_in(1, 9)  # room to come back is not room to grow


def test_pool_counts_references_and_refuses_a_double_release() -> None:
    pool = BlockPool(2)
    block = pool.allocate()
    assert pool.ref_count(block) == 1 and pool.num_free == 1
    pool.release(block)
    assert pool.num_free == 2
    with pytest.raises(AssertionError):
        pool.release(block)


@pytest.mark.parametrize("kwargs", [{"num_device_blocks": -1}, {"num_host_blocks": -1}, {"block_size": 0}])
def test_bad_sizes_are_value_errors(kwargs: dict) -> None:
    args = {"num_device_blocks": 1, "num_host_blocks": 1, "block_size": 16} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BlockManager(**args)


def test_block_move_is_plain_data() -> None:
    assert BlockMove(1, 2) == BlockMove(src=1, dst=2)
