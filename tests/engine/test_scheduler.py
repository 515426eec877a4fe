"""The scheduler: budgets, continuous batching, preemption by swap and recompute, abort."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.engine.block_manager import BlockManager
from veil.engine.costs import MeasuredCosts
from veil.engine.request import FinishReason, Sequence, SequenceStatus
from veil.engine.scheduler import PreemptionMode, Scheduler, SchedulerConfig, SchedulerOutput
from veil.model.sampling import SamplingParams

_ids = itertools.count()


def make(
    device: int = 8,
    host: int = 8,
    block_size: int = 4,
    tokens: int = 64,
    seqs: int = 8,
    mode: PreemptionMode = PreemptionMode.SWAP,
    costs: MeasuredCosts | None = None,
) -> Scheduler:
    bm = BlockManager(num_device_blocks=device, num_host_blocks=host, block_size=block_size)
    config = SchedulerConfig(max_num_batched_tokens=tokens, max_num_seqs=seqs, preemption_mode=mode)
    return Scheduler(config, bm, costs)


def seq(prompt_len: int, max_tokens: int = 8, seq_id: int | None = None) -> Sequence:
    seq_id = next(_ids) if seq_id is None else seq_id
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(seq_id, list(range(1, prompt_len + 1)), params, stop_token_ids=frozenset({0}))


def step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    out = s.schedule()
    s.postprocess(out, {c.seq_id: token for c in out.chunks if c.sample})
    return out


def test_prefill_then_decode_share_a_step() -> None:
    s = make()
    a = seq(5)
    s.add(a)
    first = step(s)
    assert [(c.seq_id, c.start, len(c.token_ids), c.sample) for c in first.chunks] == [(a.seq_id, 0, 5, True)]
    b = seq(3)
    s.add(b)
    second = step(s)
    assert [(c.start, len(c.token_ids)) for c in second.chunks] == [(5, 1), (0, 3)]
    assert second.chunks[0].token_ids == (7,)
    assert a.output_token_ids == [7, 7] and b.output_token_ids == [7]


def test_a_long_prompt_is_prefilled_in_chunks_within_the_token_budget() -> None:
    s = make(device=16, tokens=8)
    a = seq(20)
    s.add(a)
    chunks = [step(s).chunks[0] for _ in range(3)]
    assert [(c.start, len(c.token_ids), c.sample) for c in chunks] == [
        (0, 8, False),
        (8, 8, False),
        (16, 4, True),
    ]
    assert a.output_token_ids == [7]
    assert chunks[1].token_ids == tuple(range(9, 17))


def test_max_num_seqs_bounds_the_running_set() -> None:
    s = make(seqs=2)
    for _ in range(3):
        s.add(seq(2))
    out = step(s)
    assert len(out.chunks) == 2 and len(s.waiting) == 1


def test_the_newest_is_swapped_out_and_comes_back_before_new_requests() -> None:
    s = make(device=4, host=8, block_size=4)
    old, new = seq(4, max_tokens=8), seq(4, max_tokens=8)
    s.add(old)
    s.add(new)
    step(s)  # both prefill: one block each
    step(s)  # both need a second block: 4 in use
    out = step(s)  # fits (positions 5, 6 are in block 2)
    assert out.preempted == []
    while not out.preempted:
        out = step(s)
    assert out.preempted == [new.seq_id] and new.status is SequenceStatus.SWAPPED
    assert len(out.swap_out) == 2 and [c.seq_id for c in out.chunks] == [old.seq_id]
    late = seq(1)
    s.add(late)
    host_blocks = [m.dst for m in out.swap_out]
    while new.status is SequenceStatus.SWAPPED:
        out = step(s)
        assert late.seq_id not in [c.seq_id for c in out.chunks] or out.swap_in  # same step, after it
    assert [m.src for m in out.swap_in] == host_blocks
    assert [c.seq_id for c in out.chunks][:1] == [new.seq_id]


def test_swap_falls_back_to_recompute_without_host_room() -> None:
    s = make(device=3, host=0, block_size=4)
    a, b = seq(4, max_tokens=5), seq(4, max_tokens=5)
    s.add(a)
    s.add(b)
    step(s)
    out = step(s)
    assert out.preempted == [b.seq_id] and out.swap_out == []
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert s.waiting[0] is b


def test_recompute_prefills_prompt_and_output_again() -> None:
    s = make(device=3, host=8, block_size=4, mode=PreemptionMode.RECOMPUTE)
    a, b = seq(4, max_tokens=8), seq(4, max_tokens=8)
    s.add(a)
    s.add(b)
    while b.status is not SequenceStatus.WAITING or not b.output_token_ids:
        step(s)
    assert s.block_manager.block_table(b.seq_id) == [] and s.block_manager.host_table(b.seq_id) == []
    while b.num_computed_tokens == 0:
        out = step(s)
    chunk = next(c for c in out.chunks if c.seq_id == b.seq_id)
    assert chunk.start == 0 and list(chunk.token_ids) == b.prompt_token_ids + b.output_token_ids[:-1]


@pytest.mark.parametrize(
    ("swap_s", "prefill_s", "swapped"),
    [(None, None, True), (1e-3, 1e-3, True), (1e-1, 1e-4, False), (1e-4, None, True)],
)
def test_auto_preempts_by_whichever_measured_cost_is_lower(swap_s, prefill_s, swapped) -> None:
    """2 blocks out and back at swap_s each, against 4+ tokens prefilled again at prefill_s each;
    swap while either cost is unknown."""
    costs = MeasuredCosts(swap_s_per_block=swap_s, prefill_s_per_token=prefill_s)
    s = make(device=3, host=8, block_size=4, mode=PreemptionMode.AUTO, costs=costs)
    a, b = seq(4, max_tokens=5), seq(4, max_tokens=5)
    s.add(a)
    s.add(b)
    step(s)
    out = step(s)
    assert out.preempted == [b.seq_id]
    assert (out.recomputed == []) == swapped and bool(out.swap_out) == swapped
    assert b.status is (SequenceStatus.SWAPPED if swapped else SequenceStatus.WAITING)
    assert (costs.swaps_chosen, costs.recomputes_chosen) == ((1, 0) if swapped else (0, 1))


def test_measured_costs_average_what_the_steps_report() -> None:
    costs = MeasuredCosts(alpha=0.5)
    costs.record_swap(0, 1.0)  # nothing moved: no information
    costs.record_forward(prefill_tokens=1, tokens=10, seconds=1.0)  # mostly decode: not a prefill figure
    assert costs.swap_s_per_block is None and costs.prefill_s_per_token is None
    costs.record_swap(4, 0.4)
    costs.record_swap(2, 0.6)
    assert costs.swap_s_per_block == pytest.approx(0.5 * 0.1 + 0.5 * 0.3)
    costs.record_forward(prefill_tokens=8, tokens=10, seconds=0.1)
    assert costs.prefill_s_per_token == pytest.approx(0.01)
    assert costs.swap_cost_s(3) == pytest.approx(2 * 3 * 0.2)
    assert costs.recompute_cost_s(50) == pytest.approx(0.5)
    assert not costs.prefer_swap(blocks=3, tokens=50) and costs.prefer_swap(blocks=3, tokens=200)


def test_a_request_that_never_fits_is_rejected_with_the_numbers() -> None:
    s = make(device=2, block_size=4)
    with pytest.raises(
        ValueError, match=r"10 KV slots .* 3 blocks of 4; the device has 2 blocks \(8 slots\)"
    ):
        s.add(seq(6, max_tokens=5))
    s.add(seq(6, max_tokens=3))  # 8 slots: fits exactly
    with pytest.raises(ValueError, match="at least one token"):
        s.add(seq(0))


def test_abort_frees_blocks_wherever_the_sequence_is() -> None:
    s = make(device=4, host=8, block_size=4)
    a, b, c, d = seq(4, max_tokens=5), seq(4, max_tokens=5), seq(4, max_tokens=5), seq(4, max_tokens=5)
    for x in (a, b, c, d):
        s.add(x)
    step(s)
    step(s)  # c swapped out for b's second block
    assert [x.status for x in (a, b, c, d)] == [SequenceStatus.RUNNING] * 2 + [SequenceStatus.SWAPPED] + [
        SequenceStatus.WAITING
    ]
    for x in (a, b, c, d):
        assert s.abort(x.seq_id) is x and x.finish_reason is FinishReason.ABORT
    assert s.abort(a.seq_id) is None
    assert not s.has_unfinished()
    assert s.block_manager.device.num_free == 4 and s.block_manager.host.num_free == 8


def test_finishing_by_length_and_stop_frees_blocks() -> None:
    s = make()
    a, b = seq(3, max_tokens=2), seq(3, max_tokens=9)
    s.add(a)
    s.add(b)
    step(s, token=5)
    step(s, token=5)
    assert a.finish_reason is FinishReason.LENGTH and a.output_token_ids == [5, 5]
    step(s, token=0)
    assert b.finish_reason is FinishReason.STOP
    assert not s.has_unfinished() and s.block_manager.device.num_free == 8


# property test ---------------------------------------------------------------------------------------
class FakeKV:
    """Slot contents of every block, moved as the plans say: checks that swaps restore every token."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.device: dict[int, dict[int, tuple[int, int]]] = {}
        self.host: dict[int, dict[int, tuple[int, int]]] = {}

    def apply(self, out: SchedulerOutput) -> None:
        for m in out.swap_out:
            self.host[m.dst] = dict(self.device.get(m.src, {}))
        for m in out.swap_in:
            self.device[m.dst] = dict(self.host[m.src])
        bs = self.bm.block_size
        for c in out.chunks:
            for pos in range(c.start, c.start + len(c.token_ids)):
                self.device.setdefault(c.block_table[pos // bs], {})[pos % bs] = (c.seq_id, pos)

    def check(self, s: Scheduler) -> None:
        bs = self.bm.block_size
        for x in s.running:
            table = self.bm.block_table(x.seq_id)
            for pos in range(x.num_computed_tokens):
                assert self.device[table[pos // bs]][pos % bs] == (x.seq_id, pos)


def check_ownership(s: Scheduler) -> None:
    bm = s.block_manager
    live = {x.seq_id for x in s.running + s.waiting + s.swapped}
    for pool, table_of in ((bm.device, bm.block_table), (bm.host, bm.host_table)):
        owned = [b for sid in live for b in table_of(sid)]
        assert len(owned) == len(set(owned)), "a block owned twice"
        assert len(owned) + pool.num_free == pool.num_blocks, "a block leaked"
        assert all(pool.ref_count(b) == 1 for b in owned)
    for x in s.running:
        assert bm.blocks_for(x.num_computed_tokens) <= len(bm.block_table(x.seq_id))
    for x in s.swapped:
        assert bm.block_table(x.seq_id) == [] and bm.host_table(x.seq_id)
    for x in s.waiting:
        assert bm.block_table(x.seq_id) == [] and bm.host_table(x.seq_id) == []


actions = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 12), st.integers(1, 40)),
        st.tuples(st.just("step"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 30), st.just(0)),
    ),
    min_size=12,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    actions=actions,
    device=st.integers(4, 10),
    host=st.integers(0, 16),
    tokens=st.integers(1, 24),
    mode=st.sampled_from(PreemptionMode),
    swap_s=st.sampled_from([None, 1e-4, 1e-2]),
)
def test_no_block_leaks_or_is_shared_and_swaps_restore_every_token(
    actions, device, host, tokens, mode, swap_s
) -> None:
    costs = MeasuredCosts(swap_s_per_block=swap_s, prefill_s_per_token=1e-3)  # AUTO: both choices occur
    s = make(device=device, host=host, block_size=4, tokens=tokens, seqs=6, mode=mode, costs=costs)
    kv = FakeKV(s.block_manager)
    added: list[Sequence] = []
    for kind, a, b in actions:
        if kind == "add":  # as long as fits alone: long requests are what make the device run out
            x = seq(a, max_tokens=min(b, 4 * device - a + 1))
            s.add(x)
            added.append(x)
        elif kind == "step":
            out = s.schedule()
            kv.apply(out)
            s.postprocess(out, {c.seq_id: 1 + a for c in out.chunks if c.sample})  # a == 0 -> never stop
        elif added:
            s.abort(added[a % len(added)].seq_id)
        check_ownership(s)
        kv.check(s)
    for _ in range(2000):  # everything left finishes: no livelock
        if not s.has_unfinished():
            break
        out = s.schedule()
        assert out.chunks, "a step with work left scheduled nothing"
        kv.apply(out)
        s.postprocess(out, {c.seq_id: 5 for c in out.chunks if c.sample})
        check_ownership(s)
        kv.check(s)
    assert not s.has_unfinished()
    assert s.block_manager.device.num_free == device and s.block_manager.host.num_free == host
    for x in added:
        assert x.finished
        assert x.finish_reason is FinishReason.ABORT or len(x.output_token_ids) == x.params.max_tokens
