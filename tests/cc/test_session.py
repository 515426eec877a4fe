"""Key agreement: both sides derive the same per-direction secrets; epochs and directions differ."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from veil.cc.session import ChannelSecrets, Direction, KeyExchange, agree


def test_host_and_device_agree() -> None:
    host, device = agree()
    assert host == device
    assert host.h2d.key != host.d2h.key and host.h2d.iv_mask != host.d2h.iv_mask
    assert host.for_direction(Direction.D2H) is host.d2h


def test_derivation_is_deterministic_through_the_randomness_seam() -> None:
    keys = [X25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (1, 2)]
    first = [KeyExchange(_private_key=k) for k in keys]
    publics = {"host_public": first[0].public_bytes, "device_public": first[1].public_bytes}
    again = KeyExchange(_private_key=keys[0]).derive(**publics, epoch=0)
    assert first[0].derive(**publics, epoch=0) == again
    assert first[0].derive(**publics, epoch=1) != again
    assert first[1].derive(**publics, epoch=0) == again


def test_derive_refuses_foreign_publics() -> None:
    mine, a, b = KeyExchange(), KeyExchange(), KeyExchange()
    with pytest.raises(ValueError, match="host_public or device_public"):
        mine.derive(host_public=a.public_bytes, device_public=b.public_bytes, epoch=0)


BAD_SECRETS = [(bytes(31), bytes(12)), (bytes(32), bytes(11)), ("k" * 32, bytes(12))]


@pytest.mark.parametrize(("key", "mask"), BAD_SECRETS)
def test_secrets_validate_lengths(key: bytes, mask: bytes) -> None:
    with pytest.raises(ValueError, match="bytes"):
        ChannelSecrets(key, mask)


def test_secrets_repr_hides_key() -> None:
    secrets = ChannelSecrets(b"\x42" * 32, bytes(12))
    assert "42" not in repr(secrets) and "B" * 4 not in repr(secrets)
