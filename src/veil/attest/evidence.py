"""Attestation evidence: what an enclave sends, the report data that binds its key, the one error type.

Evidence binds an enclave's public key (of a named KEM) and a server-issued nonce to a measurement of
the enclave, through `report_data(kem, public_key, nonce)`, a SHA-512 (64 bytes, the size of TDX
REPORTDATA, SEV-SNP REPORT_DATA and configfs-tsm's inblob). Both sides run this module: the enclave to
produce evidence, the verifier to check it.
"""

from __future__ import annotations

import base64
import enum
import hashlib
from dataclasses import dataclass
from typing import Any

from veil.errors import VeilError

NONCE_SIZE = 32  # bytes of a challenge nonce
SIMULATED = "veil-simulated"  # the provider name of veil's simulated platform
SIM_MAGIC = b"VEILSIM1"
_X25519_BYTES = 32
_MLKEM768_BYTES = 1184


class VerificationError(VeilError):
    """Evidence, a nonce or a wrapped/sealed blob failed verification. Deliberately uninformative."""

    def __init__(self, reason: str = "verification failed") -> None:
        super().__init__("verification failed")
        self.reason = reason  # for the verifier's logs; never send it to the peer


class Kem(enum.Enum):
    """The KEM of the enclave's provisioning key (see `veil.attest.wrap` for the whole HPKE suite)."""

    X25519 = "x25519"  # DHKEM(X25519, HKDF-SHA256), RFC 9180 kem_id 0x0020
    MLKEM768_X25519 = "mlkem768-x25519"  # hybrid post-quantum KEM (ML-KEM-768 + X25519)

    @property
    def public_key_size(self) -> int:
        """X25519: 32 bytes; hybrid: ML-KEM-768's 1184 then X25519's 32."""
        return _X25519_BYTES if self is Kem.X25519 else _MLKEM768_BYTES + _X25519_BYTES


def report_data(kem: Kem, public_key: bytes, nonce: bytes) -> bytes:
    """The 64 bytes an enclave puts in its report: SHA-512(kem name || 0 || public_key || nonce).

    The KEM fixes the key's length, so the encoding is unambiguous.
    """
    if len(public_key) != kem.public_key_size:
        raise ValueError(f"a {kem.value} public key is {kem.public_key_size} bytes, got {len(public_key)}")
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return hashlib.sha512(kem.value.encode() + b"\0" + public_key + nonce).digest()


@dataclass(frozen=True)
class Evidence:
    """What an enclave sends to be provisioned: its public key, the nonce, and a platform report.

    `provider` names the report format: `SIMULATED` ("veil-simulated"), "tdx_guest" or
    "sev_guest" (configfs-tsm's provider names).
    """

    provider: str
    public_key: bytes
    nonce: bytes
    report: bytes
    kem: Kem = Kem.X25519

    def to_json(self) -> dict[str, str]:
        return {
            "provider": self.provider,
            "kem": self.kem.value,
            "public_key": self.public_key.hex(),
            "nonce": self.nonce.hex(),
            "report": base64.b64encode(self.report).decode("ascii"),
        }

    @classmethod
    def from_json(cls, raw: Any) -> Evidence:
        """Parse; malformed input raises `ValueError` with the field at fault."""
        if not isinstance(raw, dict):
            raise ValueError("evidence must be a JSON object")
        try:
            return cls(
                provider=str(raw["provider"]),
                public_key=bytes.fromhex(raw["public_key"]),
                nonce=bytes.fromhex(raw["nonce"]),
                report=base64.b64decode(raw["report"], validate=True),
                kem=Kem(raw.get("kem", Kem.X25519.value)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed evidence: {exc}") from None


@dataclass(frozen=True)
class VerifiedEnclave:
    """An enclave that passed verification: provision weights for `public_key`."""

    public_key: bytes
    measurement: bytes
    provider: str
    kem: Kem = Kem.X25519


def simulated_signed_bytes(measurement: bytes, data: bytes, signer: bytes) -> bytes:
    """The part of a simulated report that its platform key signs."""
    if (len(measurement), len(data), len(signer)) != (48, 64, 32):
        raise ValueError("measurement, report data and signer must be 48, 64 and 32 bytes")
    return SIM_MAGIC + measurement + data + signer
