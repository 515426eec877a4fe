"""Property test: a fake channel driven by the speculator through random traffic and failures.

The fake mechanism carries out every decision literally and records, per IV, what was sealed and
what was emitted. Whatever happens (cyclic traffic, random keys, host writes, control messages,
late or failed workers, multi-chunk transfers announced or decided whole, speculation held and let
go), the emitted stream must use IVs 0, 1, 2, ... once each, no IV may seal two
different data plaintexts, an IV burned by a NOP must never also emit data, and every request must
deliver exactly its source's content at request time.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from veil.pipellm import (
    Commit,
    Decision,
    PadThenCommit,
    Relinquish,
    SealNow,
    Speculator,
    SpeculatorConfig,
    TransferKey,
    Wait,
    default_predictor,
)
from veil.pipellm.keys import chunks

MB = 1 << 20
BULK = [TransferKey(s, 0, MB) for s in range(6)]
CONTROL = TransferKey(50, 0, 100)
MEDIUM = TransferKey(51, 0, 64 * 1024)
MULTI = [TransferKey(10 + s, 0, 2 * MB + 1000 * s) for s in range(3)]  # 3 chunks each, small tails
NOP = ("nop",)


class FakeChannel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.spec = Speculator(
            default_predictor(max_period=16),
            # a short stale backoff: sources go through backing off, probation and forgiveness often
            SpeculatorConfig(depth=4, max_pad=3, max_slack=2, stale_backoff=2),
        )
        self.versions = {key.source_id: 0 for key in [*BULK, CONTROL, MEDIUM, *MULTI]}
        self.running: dict[int, tuple[int, TransferKey, int]] = {}  # job -> (iv, key, version read)
        self.ciphertexts: dict[int, tuple[int, tuple]] = {}  # job -> (iv, plaintext identity)
        self.sealed_under: dict[int, set[tuple]] = {}  # iv -> plaintexts ever sealed under it
        self.emitted: list[tuple[int, tuple]] = []
        self.cursor = 0

    # -- the mechanism -----------------------------------------------------------------------------
    def seal(self, iv: int, plaintext: tuple) -> None:
        self.sealed_under.setdefault(iv, set()).add(plaintext)

    def finish(self, job_id: int) -> None:
        iv, key, version = self.running.pop(job_id)
        plaintext = (key, version)
        self.seal(iv, plaintext)
        if self.spec.sealed(job_id, version):
            self.ciphertexts[job_id] = (iv, plaintext)

    def carry_out(self, d: Decision) -> tuple:
        for job_id in getattr(d, "dropped", ()):
            self.ciphertexts.pop(job_id, None)
        for iv in d.nop_ivs:
            self.seal(iv, NOP)
            self.emitted.append((iv, NOP))
        if isinstance(d, Commit | PadThenCommit):
            iv, plaintext = self.ciphertexts.pop(d.job_id)
            assert iv == d.iv
        else:
            assert isinstance(d, Relinquish | SealNow)
            plaintext = (d.key, d.version)
            self.seal(d.iv, plaintext)
        self.emitted.append((d.iv, plaintext))
        return plaintext

    def send(self, key: TransferKey) -> None:
        version = self.versions[key.source_id]
        d = self.spec.request(key, version)
        while isinstance(d, Wait):
            self.finish(d.job_id)
            d = self.spec.request(key, version)
        assert self.carry_out(d) == (key, version), "delivered data must be the source's current content"

    def send_transfer(self, transfer: TransferKey, interrupt: bool) -> None:
        """A multi-chunk transfer: decided whole when quiet, else announced and sent chunk by chunk
        (optionally with a control message in the middle, which ends the announcement)."""
        version = self.versions[transfer.source_id]
        parts = chunks(transfer, MB)
        if self.spec.quiet:
            ivs = self.spec.quiet_transfer(transfer)
            assert len(ivs) == len(parts) and ivs.start == len(self.emitted)
            for iv, chunk in zip(ivs, parts, strict=True):
                self.seal(iv, (chunk, version))
                self.emitted.append((iv, (chunk, version)))
            return
        self.spec.begin_transfer(transfer)
        for i, chunk in enumerate(parts):
            if interrupt and i == 1:
                self.send(CONTROL)
            self.send(chunk)

    # -- the world ---------------------------------------------------------------------------------------
    @rule(interrupt=st.booleans())
    def cyclic_transfer(self, interrupt: bool) -> None:
        self.send_transfer(MULTI[self.cursor % len(MULTI)], interrupt)
        self.cursor += 1

    @rule(transfer=st.sampled_from(MULTI), interrupt=st.booleans())
    def random_transfer(self, transfer: TransferKey, interrupt: bool) -> None:
        self.send_transfer(transfer, interrupt)

    @rule(held=st.booleans())
    def hold(self, held: bool) -> None:
        self.spec.hold(held)

    @rule()
    def cyclic_request(self) -> None:
        self.send(BULK[self.cursor % 4])
        self.cursor += 1

    @rule(key=st.sampled_from([*BULK, CONTROL, MEDIUM]))
    def random_request(self, key: TransferKey) -> None:
        self.send(key)

    @rule(source=st.sampled_from([key.source_id for key in [*BULK, *MULTI]]))
    def host_write(self, source: int) -> None:
        self.versions[source] += 1

    @rule(n=st.integers(0, 3))
    def plan(self, n: int) -> None:
        for job in self.spec.plan(n):
            self.running[job.job_id] = (job.iv, job.key, self.versions[job.key.source_id])

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 10))
    def worker_finishes(self, index: int) -> None:
        self.finish(sorted(self.running)[index % len(self.running)])

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 10))
    def worker_fails(self, index: int) -> None:
        job_id = sorted(self.running)[index % len(self.running)]
        self.running.pop(job_id)
        for dropped in self.spec.seal_failed(job_id, "boom"):
            self.ciphertexts.pop(dropped, None)

    @rule(keys=st.lists(st.sampled_from([*BULK, *MULTI]), max_size=4))
    def hint(self, keys: list[TransferKey]) -> None:
        self.spec.hint(keys)

    # -- what must always hold ----------------------------------------------------------------------------
    @invariant()
    def ivs_emitted_in_order_once(self) -> None:
        assert [iv for iv, _ in self.emitted] == list(range(len(self.emitted)))
        assert self.spec.next_iv == len(self.emitted)

    @invariant()
    def no_iv_seals_two_data_plaintexts(self) -> None:
        for iv, plaintexts in self.sealed_under.items():
            assert len(plaintexts - {NOP}) <= 1, f"IV {iv} sealed {plaintexts}"

    @invariant()
    def burned_ivs_never_emit_data_and_kept_ciphertexts_are_ahead(self) -> None:
        emitted = dict(self.emitted)
        for iv, _ in self.ciphertexts.values():
            assert iv >= self.spec.next_iv and iv not in emitted

    @invariant()
    def stats_add_up(self) -> None:
        s = self.spec.stats
        assert s.hits + s.relinquishes + s.sync_seals == s.requests
        assert s.nops == sum(1 for _, p in self.emitted if p == NOP)


TestFakeChannel = FakeChannel.TestCase
TestFakeChannel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
