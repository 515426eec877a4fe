"""The pipellm sealer as an attacker or an unlucky schedule meets it: few bounce slots with deep
pipelines, hints racing re-keys, a failing submission, and writes between hashing and sealing.

Each test runs its scenario on a thread with a deadline: a deadlock or a busy spin fails it instead of
hanging the suite."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from veil.cc.channel import Reservation
from veil.cc.device import Device
from veil.cc.link import LinkConfig
from veil.pipellm.sealer import seal_chunk
from veil.transport.base import TransportOptions
from veil.transport.pipellm import PipeLLMTransport

from .support import CHUNK, IvAudit, host, options


@pytest.fixture
def device() -> Iterator[Device]:
    with Device(capacity_bytes=64 << 20) as dev:
        yield dev


def _within(seconds: float, scenario: Callable[[], None]) -> None:
    """Run `scenario` on a thread; fail if it has not finished (deadlock, spin) after `seconds`."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            scenario()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"scenario still running after {seconds} s (deadlock or spin)"
    if errors:
        raise errors[0]


def _round_trip(transport: PipeLLMTransport, device: Device, source: object) -> None:
    target = device.alloc(source.nbytes)  # type: ignore[attr-defined]
    try:
        transport.h2d(source, target).wait(timeout=20)  # type: ignore[arg-type]
        assert torch.equal(target.bytes, source.bytes)  # type: ignore[attr-defined]
    finally:
        target.free()


@pytest.mark.parametrize(("slots", "depth", "workers"), [(1, 8, 1), (2, 16, 2), (6, 4, 2), (3, 32, 3)])
def test_few_slots_deep_pipeline_and_mispredictions_never_deadlock(
    device: Device, slots: int, depth: int, workers: int
) -> None:
    """Defect: pre-sealed chunks held bounce slots; with depth 4 and 6 slots a misprediction left a
    worker blocked on the ring while the caller waited for it. Sealed chunks now wait in private
    staging, so any ring size works with any depth."""
    link = TransportOptions(link=LinkConfig(chunk_bytes=CHUNK, ring_slots=slots))
    sources = [host(5 * CHUNK, seed) for seed in range(4)]
    order = [0, 1, 2, 3] * 4 + [2, 0, 3, 1] + [0, 1, 2, 3] * 2 + [3, 3, 0]  # cycles, then surprises

    def scenario() -> None:
        with PipeLLMTransport(device, link, options(workers=workers, depth=depth)) as transport:
            audit = IvAudit()
            audit.install(transport.link.host_tx)
            for index in order:
                _round_trip(transport, device, sources[index])
            stats = transport.stats().pipellm
            assert stats.hits > 0 and stats.relinquishes > 0, stats
            audit.check()

    _within(60, scenario)


def test_hints_racing_rekeys_never_strand_a_job(device: Device) -> None:
    """Defect: `hint()` racing `rekey()` left planned-but-unsubmitted jobs, and the next h2d spun on
    `Wait` forever. Hints, re-keys and transfers now serialize on the transport's lock."""
    sources = [host(4 * CHUNK, seed) for seed in range(3)]
    link = TransportOptions(link=LinkConfig(chunk_bytes=CHUNK, ring_slots=4))
    stop = threading.Event()

    def scenario() -> None:
        with PipeLLMTransport(device, link, options(workers=2, depth=12)) as transport:

            def hinter() -> None:
                while not stop.is_set():
                    for source in sources:
                        transport.hint(source)

            def rekeyer() -> None:
                while not stop.is_set():
                    transport.rekey()

            others = [threading.Thread(target=hinter), threading.Thread(target=rekeyer)]
            for thread in others:
                thread.start()
            try:
                for _ in range(8):
                    for source in sources:
                        _round_trip(transport, device, source)
            finally:
                stop.set()
                for thread in others:
                    thread.join(10)
            assert transport.stats().pipellm.rekeys > 0

    _within(60, scenario)


def test_a_failing_submission_turns_synchronous_and_loses_nothing(device: Device) -> None:
    """Defect: `_feed` was not exception-safe; a job planned but never submitted was waited for forever."""
    sources = [host(3 * CHUNK, seed) for seed in range(3)]

    def scenario() -> None:
        with PipeLLMTransport(device, options=None, pipellm=options()) as transport:
            sealer = transport._sealer
            pool = sealer._pool
            assert pool is not None
            real_submit = pool.submit
            calls = {"n": 0}

            def flaky_submit(*args: object, **kwargs: object) -> object:
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("injected submission failure")
                return real_submit(*args, **kwargs)  # type: ignore[arg-type]

            pool.submit = flaky_submit  # type: ignore[method-assign]
            for _ in range(6):
                for source in sources:
                    _round_trip(transport, device, source)
            stats = transport.stats().pipellm
            assert calls["n"] >= 3 and stats.synchronous
            assert stats.worker_error == "RuntimeError: injected submission failure"

    _within(60, scenario)


def test_checked_mode_seals_exactly_the_bytes_it_hashed(device: Device) -> None:
    """Defect: checked mode hashed the chunk, then sealed it by reading the source again, so a write
    A -> B -> A between the two reads committed B under A's hash. The worker now copies the chunk once,
    hashes the copy and seals the copy."""
    source = host(2 * CHUNK, seed=7)
    original = source.tensor.clone()
    tamper = {"armed": False, "done": 0}
    caller_idle = threading.Lock()  # held by the test while it transfers: the writer stays out then
    caller_idle.acquire()

    def seal_with_a_write_in_between(
        reservation: Reservation, plaintext: memoryview, *, in_place: bool = False
    ) -> None:
        if tamper["armed"] and caller_idle.acquire(timeout=0.2):  # not while the caller transfers
            try:
                source.tensor.fill_(0xBB)  # B, behind veil's back (no version bump)
                seal_chunk(reservation, plaintext, in_place=in_place)
                source.tensor.copy_(original)  # ...and back to A
                tamper["done"] += 1
            finally:
                caller_idle.release()
            return
        seal_chunk(reservation, plaintext, in_place=in_place)

    def scenario() -> None:
        with PipeLLMTransport(
            device, options=None, pipellm=options(checked=True), _seal=seal_with_a_write_in_between
        ) as transport:
            for _ in range(4):  # learn the cycle
                _round_trip(transport, device, source)
            tamper["armed"] = True
            for _ in range(6):
                caller_idle.release()  # workers seal the next chunks ahead now, with the writer armed
                time.sleep(0.05)
                caller_idle.acquire()
                _round_trip(transport, device, source)  # asserts the device holds A
            assert tamper["done"] > 0, "no chunk was sealed ahead while the writer was armed"

    _within(60, scenario)
