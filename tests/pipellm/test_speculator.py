"""Speculator: one test per decision path, failure handling, slack learning, statistics."""

from __future__ import annotations

import pytest

from veil.cc.errors import RekeyRequired
from veil.pipellm import (
    UNSEALED_VERSION,
    Commit,
    CyclicPredictor,
    Direction,
    HintPredictor,
    PadThenCommit,
    Relinquish,
    RelinquishReason,
    ReservationState,
    SealNow,
    Speculator,
    SpeculatorConfig,
    SwapPredictor,
    TransferKey,
    Wait,
)

MB = 1 << 20
CONTROL = TransferKey(900, 0, 64)


def k(source: int) -> TransferKey:
    return TransferKey(source, 0, MB)


def hinted(*keys: TransferKey, **config: int) -> Speculator:
    spec = Speculator(HintPredictor(), SpeculatorConfig(**config))
    spec.hint(list(keys))
    return spec


def seal_all(spec: Speculator, version: int = 0) -> list[int]:
    jobs = spec.plan(100)
    for job in jobs:
        assert spec.sealed(job.job_id, version)
    return [job.iv for job in jobs]


def test_commit_when_the_next_iv_holds_the_wanted_chunk() -> None:
    spec = hinted(k(0), k(1))
    assert seal_all(spec) == [0, 1]
    d = spec.request(k(0), 0)
    assert d == Commit(iv=0, job_id=d.job_id, key=k(0), version=0)
    assert isinstance(spec.request(k(1), 0), Commit)
    assert spec.next_iv == 2 and spec.stats.hits == 2 and spec.stats.bytes_committed == 2 * MB


def test_wait_while_sealing_then_commit() -> None:
    spec = hinted(k(0))
    (job,) = spec.plan(1)
    d = spec.request(k(0), 3)
    assert d == Wait(job.job_id, k(0)) and spec.next_iv == 0
    assert spec.stats.waits == 1 and spec.stats.requests == 0  # a Wait consumes nothing
    spec.sealed(job.job_id, 3)
    assert spec.request(k(0), 3) == Commit(0, job.job_id, k(0), 3)


def test_pad_then_commit_burns_the_skipped_reservation() -> None:
    spec = hinted(k(0), k(1), k(2))
    seal_all(spec)
    skipped = spec.pipeline[0].job_id
    d = spec.request(k(1), 0)
    assert isinstance(d, PadThenCommit)
    assert (d.nop_ivs, d.iv, d.dropped) == (range(0, 1), 1, (skipped,))
    assert isinstance(spec.request(k(2), 0), Commit)


def test_relinquish_on_miss_burns_bound_ivs_and_seals_at_a_clean_one() -> None:
    spec = hinted(k(0), k(1))
    seal_all(spec)
    d = spec.request(k(7), 0)
    assert isinstance(d, Relinquish) and d.reason is RelinquishReason.MISS
    assert (d.nop_ivs, d.iv, len(d.dropped)) == (range(0, 2), 2, 2)
    assert spec.stats.bytes_wasted == 2 * MB and spec.stats.misses == 1


def test_reserved_but_unsealed_ivs_are_reused_without_nops() -> None:
    spec = hinted(k(0), k(1))  # reserved, no job handed out
    d = spec.request(k(7), 0)
    assert isinstance(d, Relinquish) and d.nop_ivs == range(0, 0) and d.iv == 0 and d.dropped == ()


def test_stale_chunk_is_never_committed() -> None:
    spec = hinted(k(0), k(1))
    seal_all(spec, version=1)
    d = spec.request(k(0), 2)  # the host wrote source 0 after it was sealed
    assert isinstance(d, Relinquish) and d.reason is RelinquishReason.STALE
    assert d.version == 2 and d.iv == 2 and d.nop_ivs == range(0, 2)
    assert spec.stats.stale == 1


def test_stale_while_sealing_is_checked_after_the_wait() -> None:
    spec = hinted(k(0))
    (job,) = spec.plan(1)
    assert isinstance(spec.request(k(0), 5), Wait)
    spec.sealed(job.job_id, 4)
    d = spec.request(k(0), 5)
    assert isinstance(d, Relinquish) and d.reason is RelinquishReason.STALE


def test_a_chunk_its_worker_sealed_nothing_for_is_sealed_now_at_its_own_iv() -> None:
    # A worker that finds the source unknown to it (predicted before its first transfer) or being
    # written seals nothing. No ciphertext exists under that IV: the chunk is sealed there now, the
    # reservations behind it stay live, and the source does not back off (it was never written).
    spec = hinted(k(0), k(1), k(2), k(0))
    jobs = spec.plan(100)
    assert not spec.sealed(jobs[0].job_id, UNSEALED_VERSION)  # nothing to keep
    for job in jobs[1:]:
        assert spec.sealed(job.job_id, 0)
    d = spec.request(k(0), 0)
    assert isinstance(d, Relinquish) and d.reason is RelinquishReason.UNSEALED
    assert (d.nop_ivs, d.iv, d.dropped) == (range(0, 0), jobs[0].iv, ())
    assert spec.request(k(1), 0) == Commit(jobs[1].iv, jobs[1].job_id, k(1), 0)
    assert spec.request(k(2), 0) == Commit(jobs[2].iv, jobs[2].job_id, k(2), 0)
    assert spec.request(k(0), 0) == Commit(jobs[3].iv, jobs[3].job_id, k(0), 0)  # no backoff
    stats = spec.stats
    assert (stats.stale, stats.bytes_wasted, stats.bytes_sealed_ahead) == (0, 0, 3 * MB)
    assert spec.confidence == 1.0


def test_an_unsealed_chunk_past_the_pad_limit_is_sealed_at_a_nearer_clean_iv() -> None:
    spec = hinted(k(0), k(1), k(2), max_pad=1, min_slack=1, max_slack=0)
    jobs = spec.plan(100)
    for job in jobs[:2]:
        assert spec.sealed(job.job_id, 0)
    spec.sealed(jobs[2].job_id, UNSEALED_VERSION)
    d = spec.request(k(2), 0)
    assert isinstance(d, Relinquish) and d.reason is RelinquishReason.PAD_LIMIT
    assert (d.iv, d.nop_ivs, d.dropped) == (0, range(0, 0), ())
    assert spec.request(k(0), 0) == Commit(jobs[0].iv, jobs[0].job_id, k(0), 0)
    assert spec.stats.bytes_wasted == 0


def test_pad_limit_relinquishes_when_a_clean_iv_is_nearer() -> None:
    spec = hinted(k(0), k(1), k(2), max_pad=1, min_slack=1, max_slack=0)
    assert seal_all(spec) == [1, 3, 5]  # one clean IV before each reservation
    jobs = [r.job_id for r in spec.pipeline]
    d = spec.request(k(2), 0)
    assert isinstance(d, Relinquish) and d.reason is RelinquishReason.PAD_LIMIT
    # Sealed now at the nearer clean IV; only the far reservation of k(2) itself is given up: the ones
    # it would have padded over stay live (dropping them would burn chunks that may still come).
    assert d.iv == 0 and d.nop_ivs == range(0, 0) and d.dropped == (jobs[2],)
    assert spec.confidence == 1.0  # k(2) was predicted right: a placement cost, not a misprediction
    assert spec.request(k(0), 0) == Commit(1, jobs[0], k(0), 0)
    follow = spec.request(CONTROL, 0)  # the clean IV 2 is next
    assert isinstance(follow, SealNow) and follow.nop_ivs == range(2, 2) and follow.iv == 2
    assert spec.request(k(1), 0) == Commit(3, jobs[1], k(1), 0)
    follow = spec.request(CONTROL, 0)  # IV 5, k(2)'s dropped reservation, is burned on the way
    assert isinstance(follow, SealNow) and follow.nop_ivs == range(4, 4) and follow.iv == 4


def test_pads_past_the_limit_when_no_clean_iv_is_nearer() -> None:
    spec = hinted(k(0), k(1), k(2), max_pad=1, max_slack=0)
    seal_all(spec)
    d = spec.request(k(2), 0)
    assert isinstance(d, PadThenCommit) and d.nop_ivs == range(0, 2)


def test_control_traffic_is_sealed_now_and_invisible_to_predictors() -> None:
    cyclic = CyclicPredictor()
    spec = Speculator(cyclic)
    d = spec.request(CONTROL, 0)
    assert d == SealNow(range(0, 0), 0, CONTROL, 0, d.size_class)
    assert cyclic.predict(1) == [] and spec.stats.sync_seals == 1


def test_control_message_colliding_with_bound_reservations_relinquishes_them() -> None:
    spec = hinted(k(0), max_slack=0)
    seal_all(spec)
    d = spec.request(CONTROL, 0)
    assert isinstance(d, Relinquish) and d.reason is RelinquishReason.COLLISION and d.iv == 1


def test_slack_is_learned_so_control_traffic_stops_colliding() -> None:
    pattern = [k(i) for i in range(4)]
    spec = Speculator(CyclicPredictor(), SpeculatorConfig(depth=4))
    decisions = []
    for _ in range(16):  # learning pauses speculation for a while (low confidence); it resumes
        for key in pattern:
            if key == pattern[0]:
                decisions.append(spec.request(CONTROL, 0))  # one control message before layer 0
            decisions.append(spec.request(key, 0))
            seal_all(spec)
    last_cycle = decisions[-5:]
    assert isinstance(last_cycle[0], SealNow)
    assert all(isinstance(d, Commit) for d in last_cycle[1:])


def test_seal_failure_relinquishes_and_goes_synchronous() -> None:
    spec = hinted(k(0), k(1))
    a, b = spec.plan(2)
    spec.sealed(b.job_id, 0)
    assert spec.seal_failed(a.job_id, "worker died") == (a.job_id, b.job_id)
    assert spec.synchronous and spec.error == "worker died" and spec.plan(4) == []
    d = spec.request(k(0), 0)
    assert isinstance(d, SealNow) and d.nop_ivs == range(0, 2) and d.iv == 2


def test_job_dropped_while_sealing_is_discarded_when_it_finishes() -> None:
    spec = hinted(k(0))
    (job,) = spec.plan(1)
    spec.request(k(5), 0)
    assert spec.sealed(job.job_id, 0) is False
    with pytest.raises(ValueError):
        spec.sealed(job.job_id, 0)


def test_speculation_off_seals_everything_now() -> None:
    spec = Speculator(HintPredictor(), SpeculatorConfig(speculate=False))
    spec.hint([k(0)])
    assert spec.plan(4) == [] and isinstance(spec.request(k(0), 0), SealNow)


def test_swap_out_predicts_swap_in() -> None:
    spec = Speculator(SwapPredictor())
    out = TransferKey(3, 0, MB, Direction.D2H)
    spec.observe_device_to_host(out)
    (job,) = spec.plan(4)
    assert job.key == out.mirrored()
    spec.sealed(job.job_id, 0)
    assert isinstance(spec.request(out.mirrored(), 0), Commit)


def test_misuse_is_rejected() -> None:
    spec = Speculator()
    with pytest.raises(ValueError):
        spec.request(TransferKey(1, 0, MB, Direction.D2H), 0)
    with pytest.raises(ValueError):
        spec.observe_device_to_host(k(1))
    with pytest.raises(ValueError):
        spec.request(k(1), -1)
    with pytest.raises(ValueError):
        SpeculatorConfig(max_pad=1, max_slack=4)


def test_counter_limit_forces_rekey() -> None:
    spec = hinted(k(0), k(1), k(2), iv_limit=2)
    assert [r.iv for r in spec.pipeline] == [0, 1]
    spec.request(k(0), 0)
    spec.request(k(1), 0)
    with pytest.raises(RekeyRequired):
        spec.request(k(2), 0)


def test_pipeline_reports_states() -> None:
    spec = hinted(k(0), k(1), k(2))
    spec.plan(1)
    assert [r.state for r in spec.pipeline] == [
        ReservationState.SEALING,
        ReservationState.RESERVED,
        ReservationState.RESERVED,
    ]


def _drive(spec, keys) -> list:
    """Request `keys` in order, sealing every planned job at once (version 0); return decisions."""
    out = []
    for key in keys:
        for job in spec.plan(64):
            spec.sealed(job.job_id, 0)
        out.append(spec.request(key, 0))
    return out


def test_poor_predictions_pause_speculation_and_good_ones_resume_it() -> None:
    import random

    from veil.pipellm import Commit, Speculator, SpeculatorConfig, TransferKey

    mib = 1 << 20
    cycle = [TransferKey(s, 0, mib) for s in range(1, 9)]
    rng = random.Random(3)
    spec = Speculator(config=SpeculatorConfig(depth=8))
    _drive(spec, cycle * 6)  # learn the cycle
    assert not spec.paused and spec.stats.hits > 20
    # The cycle with 40% of its loads replaced by strays: pre-sealed chunks keep being burned.
    noisy = [
        TransferKey(rng.randrange(100, 10_000), 0, mib) if rng.random() < 0.4 else key for key in cycle * 12
    ]
    _drive(spec, noisy)
    assert spec.paused and spec.stats.pauses >= 1
    jobs_before = spec.stats.seal_jobs
    _drive(spec, [TransferKey(rng.randrange(100, 10_000), 0, mib) for _ in range(10)])
    assert spec.stats.seal_jobs == jobs_before  # nothing is sealed ahead while paused
    decisions = _drive(spec, cycle * 12)  # the cycle returns: confidence recovers, speculation resumes
    assert not spec.paused and spec.stats.resumes >= 1
    assert all(isinstance(d, Commit) for d in decisions[-16:])


def test_confidence_config_validation() -> None:
    from veil.pipellm import SpeculatorConfig

    for kwargs in ({"confidence_off": 0.95, "confidence_on": 0.9}, {"confidence_weight": 0.0}):
        with pytest.raises(ValueError):
            SpeculatorConfig(**kwargs)


# -- whole transfers: announced once, reserved and committed as their chunks ---------------------------------


class CountingPredictor(CyclicPredictor):
    """A cyclic predictor that records every key it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[TransferKey] = []

    def observe(self, key: TransferKey) -> None:
        self.seen.append(key)
        super().observe(key)


def chunks_of(transfer: TransferKey) -> list[TransferKey]:
    from veil.pipellm.keys import chunks

    return chunks(transfer, MB)


def send_transfer(spec: Speculator, transfer: TransferKey) -> list[object]:
    spec.begin_transfer(transfer)
    decisions = []
    for chunk in chunks_of(transfer):
        decision = spec.request(chunk, 0)
        assert not isinstance(decision, Wait)
        decisions.append(decision)
        seal_all(spec)
    return decisions


def test_a_hinted_transfer_is_reserved_as_its_chunks_and_committed() -> None:
    transfer = TransferKey(1, 0, 3 * MB + 100)  # four chunks, the last of 100 bytes
    spec = hinted(transfer, depth=8)
    assert [r.key for r in spec.pipeline] == chunks_of(transfer)
    seal_all(spec)
    decisions = send_transfer(spec, transfer)
    assert [type(d) for d in decisions] == [
        Commit
    ] * 4  # the 100-byte tail too: it belongs to a bulk transfer
    assert [d.iv for d in decisions] == [0, 1, 2, 3]


def test_the_predictor_learns_each_transfer_once_and_the_cycle_is_committed() -> None:
    predictor = CountingPredictor()
    spec = Speculator(predictor, SpeculatorConfig(depth=8))
    cycle = [TransferKey(source, 0, 3 * MB) for source in (1, 2)]
    per_round = []
    for _ in range(4):
        hits = spec.stats.hits
        for transfer in cycle:
            send_transfer(spec, transfer)
        per_round.append(spec.stats.hits - hits)
    assert predictor.seen == cycle * 4  # one observation per transfer, not per chunk
    # From the start the announcement names the rest of its transfer (2 of 3 chunks each); once the
    # cycle is learned, the first chunks are pre-sealed too.
    assert per_round[0] == 4 and per_round[-1] == 6, per_round


def test_quiet_transfer_decides_every_chunk_at_once() -> None:
    predictor = CountingPredictor()
    spec = Speculator(predictor, SpeculatorConfig(speculate=False, iv_limit=6))
    transfer = TransferKey(1, 0, 3 * MB + 1)
    assert spec.quiet_transfer(transfer) == range(0, 4)
    assert spec.next_iv == 4 and predictor.seen == [transfer]
    s = spec.stats
    assert (s.requests, s.sync_seals, s.bytes_sealed_now) == (4, 4, transfer.length)
    with pytest.raises(RekeyRequired):
        spec.quiet_transfer(transfer)  # needs IVs 4..7 of 6
    assert spec.next_iv == 4  # nothing consumed
    assert spec.quiet_transfer(TransferKey(2, 0, 2 * MB)) == range(4, 6)


def test_quiet_transfer_refuses_while_reservations_are_live() -> None:
    spec = hinted(TransferKey(1, 0, MB))
    with pytest.raises(ValueError, match="quiet"):
        spec.quiet_transfer(TransferKey(1, 0, MB))


def test_a_request_outside_the_announced_transfer_ends_the_announcement() -> None:
    predictor = CountingPredictor()
    spec = Speculator(predictor, SpeculatorConfig(speculate=False))
    transfer = TransferKey(1, 0, 2 * MB)
    first, second = chunks_of(transfer)
    spec.begin_transfer(transfer)
    assert isinstance(spec.request(first, 0), SealNow)
    assert isinstance(spec.request(CONTROL, 0), SealNow)  # a control message in between
    spec.request(second, 0)  # no longer announced: a transfer of its own
    assert predictor.seen == [transfer, second]


def test_begin_transfer_refuses_device_to_host_keys() -> None:
    spec = Speculator(HintPredictor())
    with pytest.raises(ValueError):
        spec.begin_transfer(TransferKey(1, 0, MB, Direction.D2H))


@pytest.mark.parametrize("length", [0, 1, MB - 1, MB, MB + 1, 3 * MB + 100])
def test_chunk_count_is_the_number_of_chunks(length: int) -> None:
    from veil.pipellm.keys import chunk_count

    assert chunk_count(length, MB) == len(chunks_of(TransferKey(1, 0, length)))


def test_held_transfers_are_learned_in_order_before_the_predictor_is_consulted() -> None:
    """While held, transfers are queued, not shown to the predictor one by one; before anything
    consults it (a hint, a swap-out, a refill) the queue is learned in order, slacks included."""
    cycle = [TransferKey(source, 0, 2 * MB) for source in (1, 2, 3)]
    held_predictor, reference = CountingPredictor(), CountingPredictor()
    spec = Speculator(held_predictor, SpeculatorConfig(depth=6))
    spec.hold(True)
    immediate = Speculator(reference, SpeculatorConfig(depth=6, speculate=False))
    for _ in range(5):
        for slack, transfer in enumerate(cycle):
            for s in (spec, immediate):
                for _ in range(slack):
                    s.request(CONTROL, 0)  # `slack` control messages before this transfer
                s.quiet_transfer(transfer)
    assert held_predictor.seen == [] and len(reference.seen) == 15  # queued while held
    assert spec.next_iv == immediate.next_iv  # the IVs were decided at once all the same
    spec.hint([])  # consults the predictor: the queue first, in order
    assert held_predictor.seen == reference.seen == cycle * 5
    spec.hold(False)  # the cycle (period 3) is predicted; each transfer's learned slack spaces it out
    reserved = {r.key.source_id: r.iv for r in spec.pipeline if r.key.offset == 0}
    first_ivs = [reserved[t.source_id] for t in cycle]
    assert spec.config.min_slack == 0
    assert first_ivs[0] == spec.next_iv  # no control message before the cycle's first transfer
    assert first_ivs[1] - first_ivs[0] == 2 + 1  # two chunks, then one clean IV for one message
    assert first_ivs[2] - first_ivs[1] == 2 + 2


def test_held_transfers_are_learned_in_batches_and_before_a_rekey() -> None:
    predictor = CountingPredictor()
    spec = Speculator(predictor, SpeculatorConfig())
    spec.hold(True)
    keys = [TransferKey(source, 0, MB) for source in range(70)]
    for key in keys:
        spec.quiet_transfer(key)
    assert predictor.seen == keys[:64]  # one batch of 64 learned at once
    spec.disable()  # a re-key's successor shares the predictor: nothing queued may be lost
    assert predictor.seen == keys


# -- sources written before every request (stale backoff) ---------------------------------------------
WEIGHTS_A, OUTPUTS = TransferKey(1, 0, 2 * MB), TransferKey(2, 0, 2 * MB)
WEIGHTS_B = TransferKey(3, 0, 3 * MB)


def run_passes(spec: Speculator, passes: int, cycle: list[TransferKey], written: set[int]) -> list[list]:
    """Send `cycle` `passes` times; the host writes each source in `written` right before sending it,
    after its worker may have pre-sealed it. Workers seal every job as soon as it is handed out, with
    the source's version at that moment. Returns each pass's decisions."""
    version = {t.source_id: 0 for t in cycle}
    out = []
    for _ in range(passes):
        decisions = []
        for transfer in cycle:
            for job in spec.plan(100):
                assert spec.sealed(job.job_id, version[job.key.source_id])
            if transfer.source_id in written:
                version[transfer.source_id] += 1
            spec.begin_transfer(transfer)
            for chunk in chunks_of(transfer):
                decision = spec.request(chunk, version[chunk.source_id])
                assert not isinstance(decision, Wait)
                decisions.append(decision)
                for job in spec.plan(100):
                    assert spec.sealed(job.job_id, version[job.key.source_id])
        out.append(decisions)
    return out


def _kinds(decisions: list) -> list[str]:
    return [type(d).__name__ for d in decisions]


def test_a_source_written_before_every_request_backs_off_and_spares_the_pipeline() -> None:
    cycle = [WEIGHTS_A, OUTPUTS, WEIGHTS_B]
    spec = Speculator(CyclicPredictor(min_matches=2), SpeculatorConfig(depth=8))
    passes = run_passes(spec, 40, cycle, written={OUTPUTS.source_id})
    # Stale retries back off 1, 2, 4, 8, 16 transfers: a handful in 40 passes, not one per pass.
    assert 3 <= spec.stats.stale <= 6, spec.stats
    # A backed-off pass: the outputs' chunks are sealed now at clean IVs and every weight chunk is
    # committed with no padding: the pipeline behind them survived. The only NOP burns a reservation
    # made on probation, dropped when the retry before it went stale (one per stale retry at most).
    steady = [p for p in passes[4:] if not any(isinstance(d, Relinquish) for d in p)]
    assert len(steady) >= 30
    for decisions in steady:
        assert _kinds(decisions) == ["Commit"] * 2 + ["SealNow"] * 2 + ["Commit"] * 3, decisions
        assert not any(d.nop_ivs for d in decisions[:2] + decisions[3:])
    # The only NOPs burn reservations made on probation, dropped when the retry went stale: at most
    # the outputs' chunks per stale retry.
    nops = sum(len(d.nop_ivs) for p in passes[4:] for d in p)
    assert nops <= len(chunks_of(OUTPUTS)) * spec.stats.stale
    assert spec.stats.volatile_seals >= 2 * 30
    ivs = [d.iv for p in passes for d in p]
    assert ivs == sorted(set(ivs))  # every IV at most once, in order


def test_a_backoff_that_moves_the_positions_does_not_stop_the_pipeline() -> None:
    # A source's backoff changing (skipped, on probation, skipped again) moves by its chunks the
    # positions of the transfers after it: the pipeline's tail, reserved before, is no longer at
    # the position the predictor puts it. The pipeline is still extended after the tail, so the
    # workers always have `depth` reservations (before, none until the request met the tail).
    weights, outputs, hidden = TransferKey(1, 0, 12 * MB), TransferKey(2, 0, 2 * MB), TransferKey(3, 0, MB)
    spec = Speculator(CyclicPredictor(min_matches=2), SpeculatorConfig(depth=14))
    version = {1: 0, 2: 0, 3: 0}
    live_counts = []
    for n in range(40):
        for transfer in (weights, outputs, hidden):
            if transfer is not weights:
                version[transfer.source_id] += 1  # the host writes it after its worker may have sealed it
            spec.begin_transfer(transfer)
            for chunk in chunks_of(transfer):
                assert not isinstance(spec.request(chunk, version[chunk.source_id]), Wait)
                for job in spec.plan(100):
                    spec.sealed(job.job_id, version[job.key.source_id])
                if n >= 4:
                    live_counts.append(sum(r.state is not ReservationState.DROPPED for r in spec.pipeline))
    assert spec.stats.stale >= 8  # the backoffs moved many times
    assert min(live_counts) == 14


def test_without_backoff_every_stale_chunk_relinquishes_the_pipeline() -> None:
    cycle = [WEIGHTS_A, OUTPUTS, WEIGHTS_B]
    stats = {}
    for backoff in (0, 64):
        spec = Speculator(CyclicPredictor(min_matches=2), SpeculatorConfig(depth=8, stale_backoff=backoff))
        run_passes(spec, 40, cycle, written={OUTPUTS.source_id})
        stats[backoff] = spec.stats
    assert stats[0].volatile_seals == 0 and stats[0].stale >= 35
    # Each stale chunk burns what was pre-sealed behind it (sealed again, padded over with NOPs).
    assert stats[64].bytes_wasted * 4 < stats[0].bytes_wasted, stats
    assert stats[64].nops * 4 < stats[0].nops, stats


def test_a_source_no_longer_written_is_forgiven_on_its_next_hit() -> None:
    cycle = [WEIGHTS_A, OUTPUTS, WEIGHTS_B]
    spec = Speculator(CyclicPredictor(min_matches=2), SpeculatorConfig(depth=8, stale_backoff=4))
    run_passes(spec, 12, cycle, written={OUTPUTS.source_id})
    on_demand = spec.stats.volatile_seals
    assert on_demand > 0
    later = run_passes(spec, 14, cycle, written=set())  # the host stops writing the outputs
    # Within one backoff (at most 4 transfers, after the stale retry the change of versions may meet)
    # the outputs are pre-sealed again, and stay so; their escape IVs (a NOP before the weights after
    # them) end once `stale_backoff` chunks in a row held and the reservations made meanwhile are used.
    assert spec.stats.volatile_seals - on_demand <= 2 * (4 + 1)
    assert any(isinstance(d, PadThenCommit) for p in later[3:8] for d in p)
    for decisions in later[10:]:
        assert _kinds(decisions) == ["Commit"] * 7
    stale = spec.stats.stale
    run_passes(spec, 3, cycle, written={OUTPUTS.source_id})  # written again: the backoff restarts at 1
    assert spec.stats.stale - stale <= 2


def run_late_passes(
    spec: Speculator, passes: int, cycle: list[TransferKey], written: set[int], early: dict[int, set[int]]
) -> list[list]:
    """Like `run_passes`, but a worker seals a chunk of a source in `written` only once the host has
    written it in the pass (pre-sealed after the write: it holds), except for the sources `early[p]`
    in pass p, sealed as soon as handed out (before the write: stale). Needs depth below one pass, so
    that a source has one reservation at a time."""
    version = {t.source_id: 0 for t in cycle}
    pending: list = []  # jobs of written sources waiting for the write

    def seal_ready(p: int) -> None:
        pending.extend(spec.plan(100))
        for job in list(pending):
            source = job.key.source_id
            if source not in written or source in early.get(p, set()):
                spec.sealed(job.job_id, version[source])
                pending.remove(job)

    out = []
    for p in range(passes):
        decisions = []
        for transfer in cycle:
            seal_ready(p)
            source = transfer.source_id
            if source in written:
                version[source] += 1
                for job in [j for j in pending if j.key.source_id == source]:
                    spec.sealed(job.job_id, version[source])
                    pending.remove(job)
            spec.begin_transfer(transfer)
            for chunk in chunks_of(transfer):
                decision = spec.request(chunk, version[source])
                assert not isinstance(decision, Wait)
                decisions.append(decision)
                seal_ready(p)
        out.append(decisions)
    return out


def test_a_source_written_between_transfers_gets_escape_ivs_before_it_first_goes_stale() -> None:
    # Two activation-like sources, written before every transfer and pre-sealed after the write (they
    # hold), until B is sealed before its write once (pass 3: stale, then on demand in the clean IV
    # left for it) and A once (pass 4). Without escape IVs, A's stale chunk took the clean IV left for
    # B, and B's chunk, sealed on demand, burned every reservation behind it (a collision).
    w1, w2 = TransferKey(1, 0, 4 * MB), TransferKey(2, 0, 4 * MB)
    a, b = TransferKey(10, 0, MB), TransferKey(11, 0, MB)
    spec = Speculator(CyclicPredictor(min_matches=2), SpeculatorConfig(depth=8))
    passes = run_late_passes(spec, 8, [w1, a, b, w2], {10, 11}, early={3: {11}, 4: {10}})
    relinquished = [d for p in passes[2:] for d in p if isinstance(d, Relinquish)]
    assert [d.reason for d in relinquished] == [RelinquishReason.STALE] * 2
    assert all(len(d.dropped) == 1 for d in relinquished)  # each burned only its own stale chunk
    assert spec.stats.bytes_wasted == 2 * MB
    # The price: one NOP per held transfer of a written source (its escape IV).
    assert [len(d.nop_ivs) for d in passes[7]] == [0] * 5 + [1, 1] + [0] * 3
    ivs = [d.iv for p in passes for d in p]
    assert ivs == sorted(set(ivs))


def test_a_backed_off_source_too_large_to_leave_room_for_stops_reserving_past_it() -> None:
    huge = TransferKey(2, 0, 20 * MB)  # 20 chunks: more clean IVs than padding would ever burn (16)
    cycle = [WEIGHTS_A, huge, WEIGHTS_B]
    spec = Speculator(CyclicPredictor(min_matches=2), SpeculatorConfig(depth=8))
    passes = run_passes(spec, 24, cycle, written={huge.source_id})
    steady = [p for p in passes[4:] if not any(isinstance(d, Relinquish) for d in p)]
    assert len(steady) >= 16
    for decisions in steady:
        kinds = _kinds(decisions)
        # Nothing is reserved past the huge transfer while it is owed clean IVs: its chunks are sealed
        # now; the weights after it are reserved once its last chunks are requested.
        assert kinds[:2] == ["Commit"] * 2 and kinds[2:22] == ["SealNow"] * 20, kinds
        assert all(not d.nop_ivs for d in decisions[:22])
    ivs = [d.iv for p in passes for d in p]
    assert ivs == sorted(set(ivs))


def test_stale_backoff_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="stale_backoff"):
        SpeculatorConfig(stale_backoff=-1)
