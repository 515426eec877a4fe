"""Published AES-256-GCM vectors through the channel's sealing seam (key, IV mask and AAD injected)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veil.cc.bounce import BounceRing
from veil.cc.channel import TAG_BYTES, ReceiverChannel, SenderChannel, iv_for
from veil.cc.session import ChannelSecrets

VECTORS = json.loads((Path(__file__).parent / "data" / "gcm_vectors.json").read_text())["vectors"]


def _channels(vector: dict[str, str]) -> tuple[SenderChannel, ReceiverChannel, BounceRing]:
    # With iv_mask = the vector's IV, message 0 is sealed under IV(0) = 0 XOR mask = the vector's IV.
    secrets = ChannelSecrets(bytes.fromhex(vector["key"]), bytes.fromhex(vector["iv"]))
    aad = bytes.fromhex(vector["aad"])
    ring = BounceRing(slot_count=2, slot_bytes=64 + TAG_BYTES)
    return SenderChannel(secrets, ring, _aad=aad), ReceiverChannel(secrets, ring, _aad=aad), ring


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_sealing_matches_published_vector(vector: dict[str, str]) -> None:
    tx, _, _ = _channels(vector)
    plaintext = bytes.fromhex(vector["plaintext"])
    reservation = tx.reserve()
    reservation.seal(plaintext)
    assert reservation.message().hex() == vector["ciphertext"] + vector["tag"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_published_vector_opens_through_the_ring(vector: dict[str, str]) -> None:
    tx, rx, ring = _channels(vector)
    plaintext = bytes.fromhex(vector["plaintext"])
    tx.send(plaintext)
    with ring.tap() as tap:
        on_the_bus = tap.read(tap.pending[0])
    assert on_the_bus.hex() == vector["ciphertext"] + vector["tag"]
    out = memoryview(bytearray(len(plaintext)))
    rx.receive(out, timeout=5)
    assert bytes(out) == plaintext


def test_iv_is_counter_xor_mask() -> None:
    mask = bytes(range(12))
    assert iv_for(0, mask) == mask
    assert iv_for(1, mask) == mask[:-1] + bytes([mask[-1] ^ 1])
    assert iv_for(2**32 - 1, bytes(12)) == bytes(8) + b"\xff\xff\xff\xff"
