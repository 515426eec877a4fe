"""KV blocks: which fixed-size block of the device pool or the host swap space holds which tokens.

The block manager knows blocks and nothing else (no tensors, no model). A sequence's *block table* is
the list of block ids that hold its tokens in order: token `t` lives in block `table[t // block_size]`
at slot `t % block_size`. A sequence's blocks are either all on the device or all in the host swap
space. Swapping returns a plan, a list of `BlockMove`s, that the model runner carries out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockMove:
    """Copy one block: `src` in the pool it leaves, `dst` in the pool it enters."""

    src: int
    dst: int


class BlockPool:
    """`num_blocks` block ids with reference counts; a block is free when its count is zero."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: lowest id first
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """A free block id, now referenced once. The caller checks `num_free` first."""
        block = self._free.pop()
        self._ref_counts[block] = 1
        return block

    def release(self, block: int) -> None:
        """Drop one reference; the block is free again when none are left."""
        assert self._ref_counts[block] > 0, f"block {block} released while free"
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self._free.append(block)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]


class BlockManager:
    """Block tables of sequences over a device pool of `num_device_blocks` and a host swap space.

    Args:
        num_device_blocks: blocks in the device KV arena.
        num_host_blocks: blocks in host memory that swapped-out sequences may occupy.
        block_size: tokens per block.

    Raises:
        ValueError: if a count is negative or block_size < 1.
    """

    def __init__(self, *, num_device_blocks: int, num_host_blocks: int, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_device_blocks < 0 or num_host_blocks < 0:
            raise ValueError(
                "num_device_blocks and num_host_blocks must be >= 0, "
                f"got {num_device_blocks} and {num_host_blocks}"
            )
        self.block_size = block_size
        self.device = BlockPool(num_device_blocks)
        self.host = BlockPool(num_host_blocks)
        self._device_tables: dict[int, list[int]] = {}
        self._host_tables: dict[int, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        """The device blocks of `seq_id`, in token order (empty if it has none)."""
        return self._device_tables.get(seq_id, [])

    def host_table(self, seq_id: int) -> list[int]:
        """The host blocks of a swapped-out `seq_id`, in token order (empty if it has none)."""
        return self._host_tables.get(seq_id, [])

    # device blocks ---------------------------------------------------------------------------------
    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        """True if `seq_id`'s device table can grow to cover `num_tokens` tokens now."""
        missing = self.blocks_for(num_tokens) - len(self.block_table(seq_id))
        return missing <= self.device.num_free

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Grow `seq_id`'s device table to cover `num_tokens` tokens (a no-op if it already does)."""
        assert seq_id not in self._host_tables, f"sequence {seq_id} is swapped out"
        assert self.can_allocate(seq_id, num_tokens), f"no device blocks for sequence {seq_id}"
        table = self._device_tables.setdefault(seq_id, [])
        while len(table) < self.blocks_for(num_tokens):
            table.append(self.device.allocate())

    def free(self, seq_id: int) -> None:
        """Release every block of `seq_id`, on the device or in the swap space."""
        for block in self._device_tables.pop(seq_id, []):
            self.device.release(block)
        for block in self._host_tables.pop(seq_id, []):
            self.host.release(block)

    # swapping --------------------------------------------------------------------------------------
    def can_swap_out(self, seq_id: int) -> bool:
        return len(self.block_table(seq_id)) <= self.host.num_free

    def swap_out(self, seq_id: int) -> list[BlockMove]:
        """Move `seq_id`'s blocks to the swap space; the plan maps device block -> host block."""
        assert self.can_swap_out(seq_id), f"no host blocks for sequence {seq_id}"
        return self._move(seq_id, self._device_tables, self.device, self._host_tables, self.host)

    def can_swap_in(self, seq_id: int, num_tokens: int) -> bool:
        """True if `seq_id` can come back to the device with room for `num_tokens` tokens in all."""
        needed = max(len(self.host_table(seq_id)), self.blocks_for(num_tokens))
        return needed <= self.device.num_free

    def swap_in(self, seq_id: int) -> list[BlockMove]:
        """Move `seq_id`'s blocks back to the device; the plan maps host block -> device block."""
        assert len(self.host_table(seq_id)) <= self.device.num_free, f"no device blocks for {seq_id}"
        return self._move(seq_id, self._host_tables, self.host, self._device_tables, self.device)

    @staticmethod
    def _move(
        seq_id: int,
        src_tables: dict[int, list[int]],
        src_pool: BlockPool,
        dst_tables: dict[int, list[int]],
        dst_pool: BlockPool,
    ) -> list[BlockMove]:
        assert seq_id not in dst_tables, f"sequence {seq_id} is already there"
        plan = [BlockMove(src, dst_pool.allocate()) for src in src_tables.pop(seq_id, [])]
        for move in plan:
            src_pool.release(move.src)
        dst_tables[seq_id] = [move.dst for move in plan]
        return plan
