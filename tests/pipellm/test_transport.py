"""The pipellm transport: round trips equal to plain, speculation hits, writes, checked mode, failures."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from veil.cc.device import Device
from veil.cc.errors import RekeyRequired
from veil.cc.host import HostBuffer
from veil.cc.link import LinkConfig
from veil.pipellm import ReservationState
from veil.pipellm.governor import GovernorConfig, Phase
from veil.pipellm.options import PipeLLMOptions
from veil.transport import make_transport
from veil.transport.base import Transport, TransportKind, TransportOptions
from veil.transport.pipellm import PipeLLMTransport

from .support import CHUNK, SMALL_LINK, FlakySeal, IvAudit, host, options


@pytest.fixture
def device() -> Iterator[Device]:
    with Device(capacity_bytes=64 << 20) as dev:
        yield dev


def _cycle(transport: Transport, device: Device, sources: list[HostBuffer], rounds: int) -> None:
    """Stream every source to the device `rounds` times, checking each arrival."""
    for _ in range(rounds):
        for source in sources:
            target = device.alloc(source.nbytes)
            transport.h2d(source, target).wait()
            assert torch.equal(target.bytes, source.bytes)
            target.free()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.bool])
@pytest.mark.parametrize("numel", [0, 1, 777, (1 << 20) + 1])
def test_round_trip_equals_plain(device: Device, dtype: torch.dtype, numel: int) -> None:
    tensor = torch.randint(0, 2 if dtype == torch.bool else 100, (numel,)).to(dtype)
    results = {}
    for kind in (TransportKind.PLAIN, TransportKind.PIPELLM):
        with make_transport(kind, device) as transport:
            buffer = transport.upload(tensor)
            results[kind] = (buffer.tensor.clone(), transport.download(buffer))
            buffer.free()
    for on_device, back in results.values():
        assert torch.equal(on_device.view(torch.uint8), tensor.view(torch.uint8))
        assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


def test_cyclic_stream_is_learned_and_committed(device: Device) -> None:
    sources = [host(3 * CHUNK, seed) for seed in range(4)]
    with PipeLLMTransport(device, SMALL_LINK, options()) as transport:
        audit = IvAudit()
        audit.install(transport.link.host_tx)
        _cycle(transport, device, sources, rounds=6)
        stats = transport.stats().pipellm
    audit.check()
    assert stats.hits >= 3 * 4 * 3, stats  # the last rounds come from the pipeline
    assert stats.bytes_sealed_ahead > 0 and stats.worker_error is None and not stats.synchronous


def test_write_through_veil_is_never_committed_stale(device: Device) -> None:
    sources = [host(2 * CHUNK, seed) for seed in range(3)]
    with PipeLLMTransport(device, SMALL_LINK, options()) as transport:
        _cycle(transport, device, sources, rounds=4)
        for value in range(5):
            with sources[0].write() as tensor:
                tensor.fill_(value)
            _cycle(transport, device, sources, rounds=1)
        assert transport.stats().pipellm.speculator.stale + transport.stats().pipellm.misses >= 1


def _sealed_sources(transport: PipeLLMTransport) -> set[int]:
    """Source ids of chunks sealed ahead, once at least one is (polls the pipeline briefly)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        sealed = {r.key.source_id for r in transport.pipeline if r.state is ReservationState.SEALED}
        if sealed:
            return sealed
        time.sleep(0.001)
    raise AssertionError("nothing was sealed ahead")


def test_checked_mode_catches_writes_behind_veils_back(device: Device) -> None:
    sources = [host(2 * CHUNK, seed) for seed in range(3)]
    by_id = {s.source_id: s for s in sources}
    # Every source sealed ahead is written each round: without `stale_backoff=0` each would be
    # sealed on demand after its first mismatch, and nothing would be left sealed ahead to write.
    with PipeLLMTransport(device, SMALL_LINK, options(checked=True, stale_backoff=0)) as transport:
        _cycle(transport, device, sources, rounds=4)
        for value in range(3):
            for source_id in _sealed_sources(transport):
                by_id[source_id].tensor.fill_(value)  # no write()/mark_written(): outside veil
            _cycle(transport, device, sources, rounds=1)
        stats = transport.stats().pipellm
    assert stats.check_mismatches >= 3 and stats.check_s > 0


def test_worker_failure_turns_synchronous_and_stays_correct(device: Device) -> None:
    flaky = FlakySeal()
    sources = [host(3 * CHUNK, seed) for seed in range(3)]
    with PipeLLMTransport(device, SMALL_LINK, options(), _seal=flaky) as transport:
        audit = IvAudit()
        audit.install(transport.link.host_tx)
        _cycle(transport, device, sources, rounds=3)
        flaky.fail_next = flaky.after_sealing = True
        _cycle(transport, device, sources, rounds=3)
        stats = transport.stats().pipellm
    audit.check()
    assert flaky.failures == 1
    assert stats.synchronous and stats.worker_error == "RuntimeError: injected worker failure"
    assert stats.speculator.seal_failures == 1


def test_async_d2h_reading_forces_decryption(device: Device) -> None:
    source = torch.randint(0, 256, (5 * CHUNK,), dtype=torch.uint8)
    with PipeLLMTransport(device, SMALL_LINK, options()) as transport:
        on_device = transport.upload(source)
        destination = HostBuffer.empty((5 * CHUNK,), torch.uint8)
        version = destination.version
        with transport._decryptor._take_lock:  # hold the background thread off
            event = transport.d2h(on_device, destination)
            assert transport.pending(destination) and destination.writing
            assert destination.stable_version() is None  # nothing speculates on a pending buffer
        transport.ensure_host_ready(destination)
        assert not transport.pending(destination) and destination.version > version
        assert torch.equal(destination.tensor, source)
        event.wait()
        assert transport.stats().pipellm.d2h_async == 1


def test_swap_out_then_in_is_sealed_ahead(device: Device) -> None:
    source = torch.randint(0, 256, (4 * CHUNK,), dtype=torch.uint8)
    with PipeLLMTransport(device, SMALL_LINK, options()) as transport:
        on_device = transport.upload(source)
        swap = HostBuffer.empty((4 * CHUNK,), torch.uint8)
        transport.d2h(on_device, swap)  # swap-out: predicts the swap-in of the same host range
        hits = transport.stats().pipellm.hits
        back = device.alloc(4 * CHUNK)
        transport.h2d(swap, back).wait()  # forces the decryption first
        assert torch.equal(back.bytes, source)
        assert transport.stats().pipellm.hits - hits == 4


def test_rekeys_when_the_epoch_runs_out(device: Device) -> None:
    small = TransportOptions(link=LinkConfig(chunk_bytes=CHUNK, ring_slots=64, counter_limit=64))
    sources = [host(2 * CHUNK, seed) for seed in range(3)]
    with PipeLLMTransport(device, small, options(depth=2, max_pad=2)) as transport:
        _cycle(transport, device, sources, rounds=12)
        assert transport.stats().pipellm.rekeys >= 1
    manual = TransportOptions(link=small.link, auto_rekey=False)
    with PipeLLMTransport(device, manual, options(depth=2, max_pad=2)) as transport:
        with pytest.raises(RekeyRequired):
            _cycle(transport, device, sources, rounds=12)


def test_sealing_in_the_caller_uses_every_iv_of_an_epoch(device: Device) -> None:
    """With speculation off, a transfer needs only its own IVs (as `cc`): 32 transfers of 2 chunks fill
    a 64-IV epoch exactly, and the 33rd re-keys (the reserve for reservations and NOPs is only kept
    while speculating)."""
    small = TransportOptions(link=LinkConfig(chunk_bytes=CHUNK, ring_slots=64, counter_limit=64))
    sources = [host(2 * CHUNK, seed) for seed in range(4)]
    with PipeLLMTransport(device, small, options(speculate=False)) as transport:
        _cycle(transport, device, sources, rounds=8)
        assert transport.stats().pipellm.rekeys == 0
        assert transport.link.host_tx.remaining() == 0
        _cycle(transport, device, sources[:1], rounds=1)
        assert transport.stats().pipellm.rekeys == 1


def test_misuse() -> None:
    with Device(capacity_bytes=1 << 20) as dev:
        with pytest.raises(TypeError, match="TransportKind"):
            make_transport("pipellm", dev)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="pipellm options"):
            make_transport(TransportKind.CC, dev, pipellm=PipeLLMOptions())
        with pytest.raises(ValueError, match="workers"):
            PipeLLMOptions(workers=0)
        transport = PipeLLMTransport(dev)
        with pytest.raises(RuntimeError, match="context manager"):
            transport.h2d(host(16, 0), dev.alloc(16))
        transport.close()


def test_hints_are_sealed_ahead_and_committed_on_first_sight(device: Device) -> None:
    """An engine's hint names chunks never seen before: they are pre-sealed and the request commits."""
    sources = [host(2 * CHUNK, seed) for seed in range(3)]
    with PipeLLMTransport(device, SMALL_LINK, options()) as transport:
        for source in sources:
            transport.hint(source)
        deadline = time.monotonic() + 10
        while transport.stats().pipellm.speculator.bytes_sealed_ahead < 6 * CHUNK:
            assert time.monotonic() < deadline, "hinted chunks were not sealed ahead in time"
            time.sleep(0.001)
        _cycle(transport, device, sources, rounds=1)
        stats = transport.stats().pipellm.speculator
    assert stats.hits == 6 and stats.misses == 0


@pytest.mark.parametrize("kind", [TransportKind.PLAIN, TransportKind.CC])
def test_non_speculative_transports_accept_and_ignore_hints(device: Device, kind: TransportKind) -> None:
    source = host(CHUNK, 1)
    with make_transport(kind, device) as transport:
        transport.hint(source, src_offset=0, nbytes=CHUNK)
        with pytest.raises(ValueError):
            transport.hint(source, src_offset=CHUNK, nbytes=1)
        _cycle(transport, device, [source], rounds=1)  # still moves data correctly


@pytest.mark.parametrize("kind", list(TransportKind))
def test_every_transport_takes_a_phase_and_refuses_anything_else(device: Device, kind: TransportKind) -> None:
    source = host(CHUNK, 1)
    with make_transport(kind, device) as transport:
        transport.enter_phase(Phase.PREFILL)
        _cycle(transport, device, [source], rounds=1)
        transport.enter_phase(Phase.DECODE)
        _cycle(transport, device, [source], rounds=1)  # still moves data correctly
        with pytest.raises(TypeError, match="Phase"):
            transport.enter_phase("decode")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="closed"):
        transport.enter_phase(Phase.DECODE)


def test_pipellm_keeps_each_phases_governor_statistics(device: Device) -> None:
    """Transfers after `enter_phase` are measured by that phase's governor; the aggregate sums them."""
    sources = [host(2 * CHUNK, seed) for seed in range(3)]
    governor = GovernorConfig(window_bytes=CHUNK, idle_factor=1e12)  # no report is idle, however slow
    with PipeLLMTransport(device, SMALL_LINK, options(governor=governor)) as transport:
        for phase, rounds in ((Phase.PREFILL, 2), (Phase.DECODE, 3), (Phase.PREFILL, 1)):
            transport.enter_phase(phase)
            _cycle(transport, device, sources, rounds=rounds)
        stats = transport.stats().pipellm
    by_phase = stats.governor_by_phase
    assert list(by_phase) == ["unlabelled", "prefill", "decode"]
    assert by_phase["unlabelled"].windows == 0  # nothing moved before the first phase
    # 2 * CHUNK per transfer and windows of CHUNK: every report closes a window; each phase's first
    # transfer is reported to nobody before it, its last to its own governor at the change
    assert by_phase["prefill"].windows == 3 * 2 + 3 * 1 - 1 and by_phase["decode"].windows == 3 * 3
    assert stats.governor.windows == sum(g.windows for g in by_phase.values())
