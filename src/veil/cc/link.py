"""The secure link between host and device: one session, two channels, two bounce rings.

Attaching runs the key exchange (`session.KeyExchange`) and builds, per direction, a bounce ring, the
sender on the sealing side and the receiver on the opening side:

    h2d: host_tx (host, caller's thread)      -> h2d_ring -> device_rx (device, copy engine)
    d2h: device_tx (device, copy engine)      -> d2h_ring -> host_rx   (host)

`rekey()` runs a fresh exchange for the next epoch, installs it on all four ends, resets both rings and
lifts any poison. It must only run while no transfer is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.cc.bounce import BounceRing
from veil.cc.channel import MAX_MESSAGES, TAG_BYTES, ReceiverChannel, SenderChannel
from veil.cc.session import agree

MIB = 1 << 20


@dataclass(frozen=True)
class LinkConfig:
    """Shape of a secure link.

    Attributes:
        chunk_bytes: plaintext bytes per message (the driver uses 1 MiB).
        ring_slots: bounce slots per direction (64 x 1 MiB by default: room for a pipellm pipeline
            of depth 32 plus messages waiting for the copy engine).
        counter_limit: IVs per direction per epoch before a re-key (2**32; small in tests).
    """

    chunk_bytes: int = MIB
    ring_slots: int = 64
    counter_limit: int = MAX_MESSAGES

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1 or self.ring_slots < 1:
            raise ValueError("chunk_bytes and ring_slots must be >= 1")
        if not 1 <= self.counter_limit <= MAX_MESSAGES:
            raise ValueError(f"counter_limit must be in [1, {MAX_MESSAGES}]")


class SecureLink:
    """Both directions of an attached session (no threads of its own).

    Args:
        config: chunk size, ring size and counter limit.
    """

    def __init__(self, config: LinkConfig | None = None) -> None:
        self.config = config or LinkConfig()
        slot_bytes = self.config.chunk_bytes + TAG_BYTES
        self.h2d_ring = BounceRing(slot_count=self.config.ring_slots, slot_bytes=slot_bytes)
        self.d2h_ring = BounceRing(slot_count=self.config.ring_slots, slot_bytes=slot_bytes)
        self.epoch = 0
        host, device = agree(self.epoch)
        limit = self.config.counter_limit
        self.host_tx = SenderChannel(host.h2d, self.h2d_ring, counter_limit=limit)
        self.device_rx = ReceiverChannel(device.h2d, self.h2d_ring, counter_limit=limit)
        self.device_tx = SenderChannel(device.d2h, self.d2h_ring, counter_limit=limit)
        self.host_rx = ReceiverChannel(host.d2h, self.d2h_ring, counter_limit=limit)

    @property
    def poisoned(self) -> bool:
        """True if either direction refused a message (until `rekey()`)."""
        return (
            self.device_rx.poisoned or self.host_rx.poisoned or self.h2d_ring.closed or self.d2h_ring.closed
        )

    def rekey(self) -> None:
        """Agree the next epoch's secrets and install them everywhere; call only when idle."""
        self.epoch += 1
        host, device = agree(self.epoch)
        self.h2d_ring.reset()
        self.d2h_ring.reset()
        self.host_tx.rekey(host.h2d)
        self.device_rx.rekey(device.h2d)
        self.device_tx.rekey(device.d2h)
        self.host_rx.rekey(host.d2h)
