"""Submissions: pre-sealed chunks committed back to back reach the copy engine as one hand-over.

The policy (`Submission`) is checked on its own; the transport is checked on the real ring, channel and
AES-GCM for what the policy promises (order, every IV sealed once, runs no longer than the limit, no
deadlock with fewer bounce slots than a run), and the sealer for the race its hook opens: a worker
that reports while the caller is submitting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from veil.cc.bounce import BounceRing
from veil.cc.channel import Reservation
from veil.cc.device import Device
from veil.cc.link import LinkConfig, SecureLink
from veil.pipellm import Commit, Direction, PadThenCommit, SealNow, SizeClass, TransferKey
from veil.pipellm.keys import chunks
from veil.pipellm.options import PipeLLMOptions
from veil.pipellm.sealer import Sealer, Start, seal_chunk
from veil.pipellm.submission import Submission
from veil.transport.base import TransportOptions
from veil.transport.pipellm import PipeLLMTransport

from .support import CHUNK, IvAudit, host, options

pytestmark = pytest.mark.timeout(60)  # a deadlock fails the test instead of hanging the run

KEY = TransferKey(1, 0, CHUNK, Direction.H2D)


@pytest.fixture
def device() -> Iterator[Device]:
    with Device(capacity_bytes=64 << 20) as dev:
        yield dev


def test_the_policy_gathers_commits_only_and_fills_at_its_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        Submission(0)
    with pytest.raises(ValueError, match="submit_chunks"):
        PipeLLMOptions(submit_chunks=0)
    assert Submission.joins(Commit(0, 1, KEY, 0))
    assert not Submission.joins(PadThenCommit(range(0, 2), 2, 1, KEY, 0, (7,)))
    assert not Submission.joins(SealNow(range(0, 0), 0, KEY, 0, SizeClass.BULK))
    submission: Submission[int] = Submission(3)
    assert [submission.add(i) for i in range(3)] == [False, False, True]
    assert submission.take() == [0, 1, 2] and len(submission) == 0 and submission.take() == []
    assert Submission(1).add(9), "a limit of 1 submits every chunk on its own"


def _record_bells(monkeypatch: pytest.MonkeyPatch, ring: BounceRing) -> list[bool]:
    """Every publish on `ring` (True if it woke the consumer itself) and every bell rung (True)."""
    bells: list[bool] = []
    publish, ring_bell = ring.publish, ring.ring_bell

    def recorded(slot: int, length: int, *, bell: bool = True) -> None:
        bells.append(bell)
        publish(slot, length, bell=bell)

    def rung() -> None:
        bells.append(True)
        ring_bell()

    monkeypatch.setattr(ring, "publish", recorded)
    monkeypatch.setattr(ring, "ring_bell", rung)
    return bells


def _longest_quiet_run(bells: list[bool]) -> int:
    longest = run = 0
    for bell in bells:
        run = 0 if bell else run + 1
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize(("limit", "slots"), [(1, 64), (3, 64), (8, 2), (64, 1)])
def test_commits_go_in_runs_of_at_most_the_limit_in_counter_order(
    device: Device, monkeypatch: pytest.MonkeyPatch, limit: int, slots: int
) -> None:
    """A cyclic stream of 6-chunk transfers: every byte lands, every IV seals one plaintext and is
    published in order, and quiet publishes come in runs of at most the limit (and of a transfer's
    6 chunks), even when the ring has fewer slots than a run (the producer rings before it waits)."""
    link = TransportOptions(link=LinkConfig(chunk_bytes=CHUNK, ring_slots=slots))
    sources = [host(6 * CHUNK, seed) for seed in range(3)]
    with PipeLLMTransport(device, link, options(workers=2, depth=12, submit_chunks=limit)) as transport:
        audit = IvAudit()
        audit.install(transport.link.host_tx)
        bells = _record_bells(monkeypatch, transport.link.h2d_ring)
        target = device.alloc(6 * CHUNK)
        for index in [0, 1, 2] * 6:
            transport.h2d(sources[index], target).wait(timeout=20)
            assert torch.equal(target.bytes, sources[index].bytes)
        stats = transport.stats().pipellm
    audit.check()
    assert stats.hits > 30, stats
    assert _longest_quiet_run(bells) <= min(limit, 6)  # a submission's run, then its bell
    if limit > 1:
        assert not all(bells), "no commit was ever gathered into a submission"


def test_a_worker_reporting_while_the_caller_submits_is_not_reported_twice() -> None:
    """Defect: before waiting for a worker the caller releases the sealer's lock to submit what it
    has gathered; a worker that reported meanwhile was then taken for one that never ran and
    reported unsealed a second time (the speculator raised). The caller now only waits."""
    gate = threading.Event()

    def gated_seal(reservation: Reservation, plaintext: memoryview, *, in_place: bool = False) -> None:
        assert gate.wait(10), "the caller never opened the gate"
        seal_chunk(reservation, plaintext, in_place=in_place)

    link = SecureLink(LinkConfig(chunk_bytes=CHUNK, ring_slots=8))
    source = host(2 * CHUNK, 5)
    transfer = TransferKey(source.source_id, 0, 2 * CHUNK, Direction.H2D)
    opts = options(workers=1, depth=4, submit_chunks=4)
    with Sealer(link.host_tx, opts, prepare_source=lambda buffer: None, seal=gated_seal) as sealer:
        sealer.hint([transfer], source)
        assert sealer.begin(transfer, source) is Start.DECIDE
        calls = []

        def submit_then_let_the_worker_finish() -> None:
            calls.append(True)
            gate.set()
            deadline = time.monotonic() + 10
            while not any(r.key.offset == 0 and r.version is not None for r in sealer.pipeline):
                assert time.monotonic() < deadline, "the worker never reported"
                time.sleep(0.001)

        first, second = chunks(transfer, CHUNK)
        decision = sealer.decide(first, source, before_wait=submit_then_let_the_worker_finish)
        assert isinstance(decision, Commit) and decision.iv == 0
        assert calls == [True]
        assert isinstance(sealer.decide(second, source), Commit)
        sealer.commit_run([decision])
        assert link.host_tx.next_counter == 1
