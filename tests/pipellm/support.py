"""Helpers for the pipellm transport tests: small links, an IV audit, a failing seal seam."""

from __future__ import annotations

import hashlib
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from veil.cc.channel import Reservation, SenderChannel
from veil.cc.host import HostBuffer
from veil.cc.link import LinkConfig
from veil.pipellm import SizeClasses
from veil.pipellm.governor import GovernorConfig
from veil.pipellm.options import PipeLLMOptions
from veil.pipellm.sealer import seal_chunk
from veil.transport.base import TransportOptions

CHUNK = 4096
SMALL_LINK = TransportOptions(link=LinkConfig(chunk_bytes=CHUNK, ring_slots=64))
EVERY_CHUNK_BULK = SizeClasses(control_below=1, bulk_above=0)  # tiny chunks still speculated


def options(**overrides: object) -> PipeLLMOptions:
    """Options for small chunks: every non-empty chunk is BULK."""
    base: dict[str, object] = {"workers": 2, "depth": 6, "sizes": EVERY_CHUNK_BULK}
    base["governor"] = GovernorConfig(enabled=False)  # these tests are of speculation: pin it on
    base.update(overrides)
    return PipeLLMOptions(**base)  # type: ignore[arg-type]


def host(nbytes: int, seed: int) -> HostBuffer:
    generator = torch.Generator().manual_seed(seed)
    return HostBuffer(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator))


@dataclass
class IvAudit:
    """Records, through the channel's sealing seam, every (IV counter -> plaintext digest) sealed,
    and every counter published, so tests can check that no IV ever sealed two plaintexts."""

    sealed: dict[tuple[int, int], set[bytes]] = field(default_factory=lambda: defaultdict(set))
    published: list[tuple[int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, sender: SenderChannel) -> None:
        seal, emit = sender._seal, sender.emit

        def audited_seal(reservation: Reservation, plaintext: memoryview | bytes, out: memoryview) -> None:
            digest = hashlib.blake2b(bytes(plaintext), digest_size=16).digest()
            with self.lock:
                self.sealed[(reservation.epoch, reservation.counter)].add(digest)
            seal(reservation, plaintext, out)

        def audited_emit(reservation: Reservation, *, bell: bool = True) -> None:
            emit(reservation, bell=bell)
            with self.lock:
                self.published.append((reservation.epoch, reservation.counter))

        sender._seal = audited_seal  # type: ignore[method-assign]
        sender.emit = audited_emit  # type: ignore[method-assign]

    def check(self) -> None:
        with self.lock:
            for iv, digests in self.sealed.items():
                assert len(digests) == 1, f"IV {iv} sealed {len(digests)} different plaintexts"
            by_epoch: dict[int, list[int]] = defaultdict(list)
            for epoch, counter in self.published:
                by_epoch[epoch].append(counter)
            for epoch, counters in by_epoch.items():
                assert counters == list(range(len(counters))), f"epoch {epoch} published out of order"
                assert all((epoch, c) in self.sealed for c in counters)


class FlakySeal:
    """A `seal` seam that fails when told to (before or after really sealing)."""

    def __init__(self) -> None:
        self.fail_next = False
        self.after_sealing = False
        self.failures = 0

    def __call__(self, reservation: Reservation, plaintext: memoryview, *, in_place: bool = False) -> None:
        if self.fail_next:
            self.fail_next = False
            self.failures += 1
            if self.after_sealing:
                seal_chunk(reservation, plaintext, in_place=in_place)
            raise RuntimeError("injected worker failure")
        seal_chunk(reservation, plaintext, in_place=in_place)
