"""Per-direction secrets, agreed when the host attaches to the device.

Stands in for SPDM's key exchange: each side contributes an ephemeral X25519 key, and HKDF-SHA256 over
the shared secret (salted with both public keys and bound to the epoch) yields, for each direction, a
32-byte AES-256-GCM key and a 12-byte IV mask. Counters are not secret and start at 0 per epoch.
Randomness enters only through `KeyExchange(_private_key=...)`, so tests can fix it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_BYTES = 32
IV_BYTES = 12
_PROTOCOL_LABEL = b"veil-cc/1 session"


class Direction(enum.Enum):
    """Which way a channel carries data."""

    H2D = "h2d"
    D2H = "d2h"


@dataclass(frozen=True)
class ChannelSecrets:
    """The secrets of one direction of one epoch.

    Attributes:
        key: 32-byte AES-256-GCM key.
        iv_mask: 12-byte mask; IV(n) = n (12 bytes, big-endian) XOR iv_mask.
        epoch: how many re-keys preceded these secrets (0 at attach).
    """

    key: bytes = field(repr=False)
    iv_mask: bytes = field(repr=False)
    epoch: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes")
        if not isinstance(self.iv_mask, bytes) or len(self.iv_mask) != IV_BYTES:
            raise ValueError(f"iv_mask must be {IV_BYTES} bytes")
        if self.epoch < 0:
            raise ValueError("epoch must be >= 0")


@dataclass(frozen=True)
class SessionSecrets:
    """Both directions' secrets of one epoch, as each side derives them."""

    h2d: ChannelSecrets
    d2h: ChannelSecrets

    def for_direction(self, direction: Direction) -> ChannelSecrets:
        """Return the secrets of `direction`."""
        return self.h2d if direction is Direction.H2D else self.d2h


class KeyExchange:
    """One side's ephemeral X25519 key for one epoch.

    Args:
        _private_key: private seam for tests; a fresh random key when None.
    """

    def __init__(self, *, _private_key: X25519PrivateKey | None = None) -> None:
        self._private_key = _private_key if _private_key is not None else X25519PrivateKey.generate()

    @property
    def public_bytes(self) -> bytes:
        """The 32-byte raw public key sent to the peer."""
        return self._private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def derive(self, *, host_public: bytes, device_public: bytes, epoch: int) -> SessionSecrets:
        """Derive both directions' secrets; host and device obtain identical results.

        Args:
            host_public: the host's raw X25519 public key.
            device_public: the device's raw X25519 public key.
            epoch: the epoch being keyed (bound into the derivation).

        Raises:
            ValueError: if this side's public key is neither of the two, or a key is malformed.
        """
        mine = self.public_bytes
        if mine not in (host_public, device_public):
            raise ValueError("this key exchange's public key must be host_public or device_public")
        peer = device_public if mine == host_public else host_public
        shared = self._private_key.exchange(X25519PublicKey.from_public_bytes(peer))
        okm = HKDF(
            algorithm=hashes.SHA256(),
            length=2 * (KEY_BYTES + IV_BYTES),
            salt=host_public + device_public,
            info=_PROTOCOL_LABEL + b" epoch=" + str(epoch).encode(),
        ).derive(shared)
        half = KEY_BYTES + IV_BYTES
        return SessionSecrets(
            h2d=ChannelSecrets(okm[:KEY_BYTES], okm[KEY_BYTES:half], epoch),
            d2h=ChannelSecrets(okm[half : half + KEY_BYTES], okm[half + KEY_BYTES :], epoch),
        )


def agree(epoch: int = 0) -> tuple[SessionSecrets, SessionSecrets]:
    """Run one exchange between a fresh host key and a fresh device key.

    Returns:
        (host's view, device's view) of the session secrets; equal unless something is broken.
    """
    host, device = KeyExchange(), KeyExchange()
    publics = {"host_public": host.public_bytes, "device_public": device.public_bytes}
    return host.derive(**publics, epoch=epoch), device.derive(**publics, epoch=epoch)
