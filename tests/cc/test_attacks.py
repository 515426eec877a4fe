"""The attacker rewrites the bounce ring; every attack is detected, destinations stay untouched.

The attacker holds the ring (`BounceRing.tap`) after the sender published its messages and applies one
attack: flip a bit, replay an old message later, reorder two messages, drop one, or truncate one. The
sender then publishes one more message, so a drop is followed by something to open. The receiver opens
the original schedule of messages: every message before the first tampered position opens intact, the
first tampered position raises IntegrityError, and every later one is refused; no refused destination
is written.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from veil.cc.bounce import Descriptor, RingTap
from veil.cc.errors import IntegrityError

from .support import make_pair

FILL = 0xA5
ATTACKS = ("flip", "replay", "reorder", "drop", "truncate")


def _attack(tap: RingTap, kind: str, data: st.DataObject) -> int:
    """Apply one attack; return the first delivery position that differs from the original."""
    pending = tap.pending
    last = len(pending) - 1
    i = data.draw(st.integers(0, last - 1 if kind in ("replay", "reorder") else last), label="i")
    victim = pending[i]
    if kind == "flip":
        offset = data.draw(st.integers(0, victim.length - 1), label="byte")
        bit = data.draw(st.integers(0, 7), label="bit")
        tap.write(victim.slot, offset, bytes([tap.read(victim)[offset] ^ (1 << bit)]))
        return i
    if kind == "truncate":
        pending[i] = Descriptor(victim.slot, data.draw(st.integers(0, victim.length - 1), label="length"))
        return i
    if kind == "drop":
        del pending[i]
        return i
    j = data.draw(st.integers(i + 1, last), label="j")
    if kind == "reorder":
        pending[i], pending[j] = pending[j], pending[i]
        return i
    pending.insert(j, tap.inject(tap.read(victim)))  # replay: an old message delivered again later
    return j


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 256), min_size=2, max_size=6),
    kind=st.sampled_from(ATTACKS),
    data=st.data(),
)
def test_every_attack_is_detected_and_poisons(sizes: list[int], kind: str, data: st.DataObject) -> None:
    pair = make_pair(chunk_bytes=256, slots=16)
    payloads = [os.urandom(n) for n in sizes]
    with pair.ring.tap() as tap:
        for payload in payloads:
            pair.tx.send(payload)
        first_bad = _attack(tap, kind, data)
    payloads.append(os.urandom(3))
    pair.tx.send(payloads[-1])

    outs = [bytearray([FILL]) * len(p) for p in payloads]
    for position, out in enumerate(outs):
        if position < first_bad:
            pair.rx.receive(memoryview(out), timeout=5)
            assert out == payloads[position]
            continue
        try:
            pair.rx.receive(memoryview(out), timeout=5)
        except IntegrityError:
            pass
        else:
            raise AssertionError(f"{kind} at position {position} was not detected")
        assert out == bytearray([FILL]) * len(out), "a refused destination was written"
    assert pair.rx.poisoned
    assert pair.rx.stats.integrity_failures == 1
    assert pair.rx.stats.refused_messages == len(payloads) - first_bad - 1
