"""Helpers for the CC tests: keyed channel pairs over a small ring."""

from __future__ import annotations

from dataclasses import dataclass

from veil.cc.bounce import BounceRing
from veil.cc.channel import TAG_BYTES, ReceiverChannel, SenderChannel
from veil.cc.session import agree


@dataclass
class Pair:
    """One direction: a sender and a receiver over one ring."""

    ring: BounceRing
    tx: SenderChannel
    rx: ReceiverChannel

    def rekey(self, epoch: int) -> None:
        host, device = agree(epoch)
        self.ring.reset()
        self.tx.rekey(host.h2d)
        self.rx.rekey(device.h2d)


def make_pair(*, chunk_bytes: int = 256, slots: int = 16, counter_limit: int = 2**32) -> Pair:
    """A fresh keyed sender/receiver pair with small messages."""
    ring = BounceRing(slot_count=slots, slot_bytes=chunk_bytes + TAG_BYTES)
    host, device = agree()
    return Pair(
        ring,
        SenderChannel(host.h2d, ring, counter_limit=counter_limit),
        ReceiverChannel(device.h2d, ring, counter_limit=counter_limit),
    )


def receive(rx: ReceiverChannel, nbytes: int) -> bytes:
    """Open the next message, expecting `nbytes` of plaintext."""
    out = memoryview(bytearray(nbytes))
    rx.receive(out, timeout=5)
    return bytes(out)
