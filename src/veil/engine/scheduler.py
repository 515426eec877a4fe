"""Continuous batching: which sequences compute which tokens in each step, and what moves where.

The scheduler holds three queues (waiting, running, swapped), a token budget per step, and the block
manager. It does no I/O and knows no tensors: `schedule()` returns a `SchedulerOutput`, a plain record
of what the step does, and `postprocess()` takes the sampled tokens back.

Policy, in order, each step:
1. Running sequences, oldest first, each get their next chunk (one token when decoding, up to the
   remaining budget when prefilling: long prompts are prefilled in chunks). When the device has no
   block for a chunk, the newest running sequence is preempted (itself, if it is the newest): by
   swapping its blocks to the host (`PreemptionMode.SWAP`, when the swap space has room) or by freeing
   them to recompute later (`RECOMPUTE`, or SWAP without host room); `AUTO` asks a
   `PreemptionCosts` (veil.engine.costs) which is cheaper for this victim.
2. If nothing was preempted, swapped sequences come back, oldest first, while the device has room.
3. Only when no sequence is swapped out are waiting ones admitted, oldest first (a sequence preempted
   by recompute is older than any new one, so it comes back first).

With LoRA adapters (a `SlotTable` given), a running sequence pins its adapter in a device slot. A
sequence is admitted (or swapped back in) only once its adapter has a slot: a waiting one whose
adapter cannot get one (every slot pinned) is deferred and the next waiting one is considered, so
the batch is not stalled; the plan lists the adapters to load (`adapter_loads`). Preempted and
finished sequences release their pins.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field

from veil.engine.block_manager import BlockManager, BlockMove
from veil.engine.costs import PreemptionCosts
from veil.engine.request import FinishReason, Sequence, SequenceStatus
from veil.lora.slots import SlotTable


class PreemptionMode(enum.Enum):
    SWAP = "swap"  # move the victim's blocks to host memory (falls back to recompute without room)
    RECOMPUTE = "recompute"  # drop the victim's blocks; prefill its prompt and output again later
    AUTO = "auto"  # per preemption, whichever the measured costs say is cheaper (swap until known)


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets of one step."""

    max_num_batched_tokens: int = 2048  # tokens computed in one step, prefill and decode together
    max_num_seqs: int = 64  # sequences running at once
    preemption_mode: PreemptionMode = PreemptionMode.SWAP

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one sequence that this step computes."""

    seq_id: int
    token_ids: tuple[int, ...]  # the tokens at positions [start, start + len)
    start: int  # position of token_ids[0]; the cache holds positions [0, start)
    block_table: tuple[int, ...]  # device blocks covering positions [0, start + len)
    sample: bool  # the chunk ends the sequence's known tokens: sample the next one
    adapter_slot: int | None = None  # device slot of the sequence's LoRA adapter (None: base model)


@dataclass
class SchedulerOutput:
    """What one step does: swap-outs first, then swap-ins, then the chunks' forward pass."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    swap_out: list[BlockMove] = field(default_factory=list)  # device block -> host block
    swap_in: list[BlockMove] = field(default_factory=list)  # host block -> device block
    preempted: list[int] = field(default_factory=list)  # seq ids, in preemption order
    recomputed: list[int] = field(default_factory=list)  # those of them preempted by recompute
    adapter_loads: list[tuple[str, int]] = field(default_factory=list)  # (adapter, slot) to load first
    deferred: list[int] = field(default_factory=list)  # waiting seq ids passed over: no adapter slot

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks)


class Scheduler:
    """Queues and budgets over a `BlockManager` (see the module docstring for the policy)."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        costs: PreemptionCosts | None = None,
        slots: SlotTable | None = None,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.slots = slots  # LoRA adapter slots; None: requests with an adapter are refused
        self._pinned: set[int] = set()  # seq ids holding a pin on their adapter
        self.costs = costs  # asked under PreemptionMode.AUTO; None: swap whenever there is room
        self.waiting: list[Sequence] = []  # sorted by seq_id (arrival)
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []  # sorted by seq_id
        self._seqs: dict[int, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence.

        Raises:
            ValueError: if the prompt is empty, or if its prompt and max_tokens can never fit in the
                device's KV blocks (it could never finish).
        """
        if not seq.prompt_token_ids:
            raise ValueError("the prompt must have at least one token")
        if seq.adapter is not None and self.slots is None:
            raise ValueError(f"request asks for adapter {seq.adapter!r} but the engine serves no adapters")
        bm = self.block_manager
        needed = bm.blocks_for(seq.max_num_tokens)
        if needed > bm.device.num_blocks:
            raise ValueError(
                f"request needs {seq.max_num_tokens} KV slots ({len(seq.prompt_token_ids)} prompt tokens "
                f"+ max_tokens {seq.params.max_tokens} - 1), {needed} blocks of {bm.block_size}; the device "
                f"has {bm.device.num_blocks} blocks ({bm.device.num_blocks * bm.block_size} slots)"
            )
        self._seqs[seq.seq_id] = seq
        bisect.insort(self.waiting, seq, key=_arrival)

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish `seq_id` wherever it is and free its blocks; None if it is not in flight."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        self._retire(seq)
        seq.finish(FinishReason.ABORT)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    # one step --------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide the next step (see the module docstring) and update queues and block tables."""
        out = SchedulerOutput()
        self._schedule_running(out)
        if not out.preempted:
            self._schedule_swapped(out)
            if not self.swapped:
                self._schedule_waiting(out)
        return out

    def postprocess(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Record the step's progress and sampled tokens; retire finished sequences.

        Returns the sequences that received a token, in the step's order (aborted ones are skipped).
        """
        touched = []
        for chunk in out.chunks:
            seq = self._seqs.get(chunk.seq_id)
            if seq is None:
                continue
            seq.num_computed_tokens = chunk.start + len(chunk.token_ids)
            if chunk.sample:
                seq.append(sampled[chunk.seq_id])
                touched.append(seq)
            if seq.finished:
                self._retire(seq)
        return touched

    # the three queues ------------------------------------------------------------------------------
    def _schedule_running(self, out: SchedulerOutput) -> None:
        queue = sorted(self.running, key=_arrival)
        self.running = []
        while queue:
            seq = queue.pop(0)
            num_tokens = min(seq.num_uncomputed_tokens, self._budget(out))
            while not self.block_manager.can_allocate(seq.seq_id, seq.num_computed_tokens + num_tokens):
                victim = queue.pop() if queue else seq
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.running.append(seq)
                if num_tokens:
                    self._add_chunk(seq, num_tokens, out)

    def _schedule_swapped(self, out: SchedulerOutput) -> None:
        bm = self.block_manager
        while self.swapped and len(self.running) < self.config.max_num_seqs and self._budget(out):
            seq = self.swapped[0]
            num_tokens = min(seq.num_uncomputed_tokens, self._budget(out))
            if not bm.can_swap_in(seq.seq_id, seq.num_computed_tokens + num_tokens):
                return
            if not self._pin(seq, out):
                return  # its adapter has no slot yet: the oldest swapped sequence goes first
            self.swapped.pop(0)
            out.swap_in.extend(bm.swap_in(seq.seq_id))
            self._run(seq, num_tokens, out)

    def _schedule_waiting(self, out: SchedulerOutput) -> None:
        index = 0
        while index < len(self.waiting) and self._has_room(out):
            seq = self.waiting[index]
            # Admit only when the whole known sequence (and its next token) fits, so a prefill does not
            # preempt someone as soon as its next chunk arrives.
            whole = min(seq.num_tokens + 1, seq.max_num_tokens)
            if not self.block_manager.can_allocate(seq.seq_id, whole):
                return
            if not self._pin(seq, out):
                out.deferred.append(seq.seq_id)  # every adapter slot is pinned: let the next one try
                index += 1
                continue
            self.waiting.pop(index)
            self._run(seq, min(seq.num_uncomputed_tokens, self._budget(out)), out)

    # helpers ---------------------------------------------------------------------------------------
    def _run(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> None:
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=_arrival)
        self._add_chunk(seq, num_tokens, out)

    def _add_chunk(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> None:
        start = seq.num_computed_tokens
        self.block_manager.allocate(seq.seq_id, start + num_tokens)
        chunk = ScheduledChunk(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.token_ids(start, start + num_tokens)),
            start=start,
            block_table=tuple(self.block_manager.block_table(seq.seq_id)),
            sample=start + num_tokens == seq.num_tokens,
            adapter_slot=self._slot(seq),
        )
        out.chunks.append(chunk)

    def _has_room(self, out: SchedulerOutput) -> bool:
        return len(self.running) < self.config.max_num_seqs and self._budget(out) > 0

    def _budget(self, out: SchedulerOutput) -> int:
        return self.config.max_num_batched_tokens - out.num_batched_tokens

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        bm = self.block_manager
        out.preempted.append(seq.seq_id)
        self._unpin(seq)
        if self._swap(seq):
            out.swap_out.extend(bm.swap_out(seq.seq_id))
            seq.status = SequenceStatus.SWAPPED
            bisect.insort(self.swapped, seq, key=_arrival)
            return
        bm.free(seq.seq_id)
        out.recomputed.append(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_arrival)

    def _pin(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Pin `seq`'s adapter in a slot (planning its load if it is not resident); False: no slot."""
        if seq.adapter is None or seq.seq_id in self._pinned:
            return True
        assert self.slots is not None  # add() refuses adapters without slots
        placement = self.slots.acquire(seq.adapter)
        if placement is None:
            return False
        self._pinned.add(seq.seq_id)
        if placement.load:
            out.adapter_loads.append((seq.adapter, placement.slot))
        return True

    def _unpin(self, seq: Sequence) -> None:
        if seq.seq_id in self._pinned:
            self._pinned.discard(seq.seq_id)
            assert self.slots is not None and seq.adapter is not None
            self.slots.release(seq.adapter)

    def _slot(self, seq: Sequence) -> int | None:
        if seq.adapter is None:
            return None
        assert self.slots is not None
        return self.slots.slot_of(seq.adapter)

    def _swap(self, seq: Sequence) -> bool:
        """Whether to preempt `seq` by swapping (else by recompute)."""
        mode, bm = self.config.preemption_mode, self.block_manager
        if mode is PreemptionMode.RECOMPUTE or not bm.can_swap_out(seq.seq_id):
            return False
        if mode is PreemptionMode.SWAP or self.costs is None:
            return True
        return self.costs.prefer_swap(len(bm.block_table(seq.seq_id)), seq.num_computed_tokens)

    def _retire(self, seq: Sequence) -> None:
        for queue in (self.waiting, self.running, self.swapped):
            if seq in queue:
                queue.remove(seq)
        self.block_manager.free(seq.seq_id)
        self._unpin(seq)
        del self._seqs[seq.seq_id]


def _arrival(seq: Sequence) -> int:
    return seq.seq_id
