"""The enclave's provisioning key pair, and the opening of what the server wrapped for it.

Security contract: the private key (X25519, or ML-KEM-768 + X25519 for the hybrid KEM) is generated here
and never leaves the object; `open` is RFC 9180 HPKE from `cryptography` with the header bound as
`info` (`veil.attest.envelope`); every failure to open raises `VerificationError`, with no detail.
"""

from __future__ import annotations

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from veil import wire
from veil.attest.envelope import INFO_LABEL, PAYLOAD, SESSION, WrapHeader, split_blob, suite
from veil.attest.evidence import Kem, VerificationError

PrivateKey = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey


class RecipientKey:
    """The enclave's key pair for one KEM; the private half never leaves this object."""

    def __init__(self, kem: Kem = Kem.X25519) -> None:
        self.kem = kem
        self._classic = x25519.X25519PrivateKey.generate()
        self._pq = mlkem.MLKEM768PrivateKey.generate() if kem is Kem.MLKEM768_X25519 else None

    def public_bytes(self) -> bytes:
        """The raw public key: X25519 (32 bytes), or ML-KEM-768 (1184) || X25519 (32)."""
        classic = self._classic.public_key().public_bytes_raw()
        return classic if self._pq is None else self._pq.public_key().public_bytes_raw() + classic

    def _private(self) -> PrivateKey:
        return self._classic if self._pq is None else hpke.MLKEM768X25519PrivateKey(self._pq, self._classic)

    def open(self, blob: bytes) -> tuple[WrapHeader, torch.Tensor, bytes]:
        """The header, weights and session token of a blob wrapped for this key, or `VerificationError`."""
        header_bytes, ciphertext = split_blob(blob)
        header = WrapHeader.decode(header_bytes)
        if header.kem is not self.kem:
            raise VerificationError("wrapped for another KEM")
        try:
            plaintext = suite(self.kem).decrypt(ciphertext, self._private(), info=INFO_LABEL + header_bytes)
            parts = wire.decode(plaintext, names=(PAYLOAD, SESSION))
        except (InvalidTag, ValueError):
            raise VerificationError("authentication failed") from None
        weights, session = parts[PAYLOAD], parts[SESSION]
        if weights.dtype != torch.float32 or tuple(weights.shape) != header.shape:
            raise VerificationError("payload does not match its header")
        return header, weights, session.numpy().tobytes()
