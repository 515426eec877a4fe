"""The channel attacks of the cc tests, in pipellm mode: detected, poisoning, destinations untouched.

A cyclic stream is learned first so the attacked transfer carries pre-sealed commits (and, after a
misprediction, NOPs and burned IVs). The attacker holds the host-to-device ring through the cc seam
(`BounceRing.tap`) while the transfer is emitted, then flips, replays, reorders, drops or truncates
one message. A follow-up transfer gives a dropped last message something to be compared with.
"""

from __future__ import annotations

from contextlib import suppress

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.cc.bounce import Descriptor, RingTap
from veil.cc.device import Device
from veil.cc.errors import IntegrityError
from veil.transport.pipellm import PipeLLMTransport

from .support import CHUNK, SMALL_LINK, host, options

FILL = 0xA5
ATTACKS = ("flip", "replay", "reorder", "drop", "truncate")


def _attack(tap: RingTap, kind: str, picks: list[int]) -> None:
    """Apply one attack; `picks` are drawn up front (the message count depends on timing)."""
    pending = tap.pending
    last = len(pending) - 1
    i = picks[0] % (last if kind in ("replay", "reorder") else last + 1)
    victim = pending[i]
    if kind == "flip":
        offset = picks[1] % victim.length
        tap.write(victim.slot, offset, bytes([tap.read(victim)[offset] ^ 0x10]))
    elif kind == "truncate":
        pending[i] = Descriptor(victim.slot, picks[1] % victim.length)
    elif kind == "drop":
        del pending[i]
    else:
        j = i + 1 + picks[2] % (last - i)
        if kind == "reorder":
            pending[i], pending[j] = pending[j], pending[i]
        else:
            pending.insert(j, tap.inject(tap.read(victim)))


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(ATTACKS),
    mispredict=st.booleans(),
    picks=st.lists(st.integers(0, 2**20), min_size=3, max_size=3),
)
def test_attacks_are_detected_in_pipellm_mode(kind: str, mispredict: bool, picks: list[int]) -> None:
    sources = [host(3 * CHUNK, seed) for seed in range(3)]
    with (
        Device(capacity_bytes=4 << 20) as device,
        PipeLLMTransport(device, SMALL_LINK, options()) as transport,
    ):
        for _ in range(3):
            for source in sources:
                target = device.alloc(source.nbytes)
                transport.h2d(source, target).wait(timeout=30)
                target.free()
        victim_source = sources[2] if mispredict else sources[0]
        target = device.alloc(victim_source.nbytes)
        target.bytes.fill_(FILL)
        with transport.link.h2d_ring.tap() as tap:
            event = transport.h2d(victim_source, target)
            _attack(tap, kind, picks)
        follow_up = device.alloc(CHUNK)
        with suppress(IntegrityError):  # the device may refuse while this one is being emitted
            transport.h2d(sources[1], follow_up, nbytes=CHUNK)
        with pytest.raises(IntegrityError):
            event.wait(timeout=30)
        chunks = [target.bytes[i : i + CHUNK] for i in range(0, target.nbytes, CHUNK)]
        expected = [victim_source.bytes[i : i + CHUNK] for i in range(0, target.nbytes, CHUNK)]
        intact = [torch.equal(c, e) for c, e in zip(chunks, expected)]
        untouched = [bool((c == FILL).all()) for c in chunks]
        first_refused = intact.index(False) if False in intact else len(intact)
        assert all(intact[:first_refused]) and all(untouched[first_refused:]), "refused chunk written"
        assert transport.link.poisoned
        with pytest.raises(IntegrityError):
            transport.h2d(sources[0], target)
        transport.rekey()
        transport.h2d(sources[0], target).wait(timeout=30)
        assert torch.equal(target.bytes, sources[0].bytes)
