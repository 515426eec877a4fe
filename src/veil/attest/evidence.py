"""Attestation evidence: what an enclave sends, the report data that binds its key, the one error type.

Evidence binds an enclave's X25519 public key and a server-issued nonce to a measurement of the enclave,
through `report_data(public_key, nonce)` = SHA-512(public_key || nonce) (64 bytes, the size of TDX
REPORTDATA, SEV-SNP REPORT_DATA and configfs-tsm's inblob). Both sides run this module: the enclave to
produce evidence, the verifier to check it.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from veil.errors import VeilError

NONCE_SIZE = 32  # bytes of a challenge nonce
PUBLIC_KEY_SIZE = 32  # bytes of a raw X25519 public key


class VerificationError(VeilError):
    """Evidence, a nonce or a wrapped/sealed blob failed verification. Deliberately uninformative."""

    def __init__(self, reason: str = "verification failed") -> None:
        super().__init__("verification failed")
        self.reason = reason  # for the verifier's logs; never send it to the peer


def report_data(public_key: bytes, nonce: bytes) -> bytes:
    """The 64 bytes an enclave puts in its report: SHA-512(public_key || nonce), both fixed-size."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"public_key must be {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}")
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return hashlib.sha512(public_key + nonce).digest()


@dataclass(frozen=True)
class Evidence:
    """What an enclave sends to be provisioned: its public key, the nonce, and a platform report.

    `provider` names the report format: `reports.SIMULATED` ("veil-simulated"), "tdx_guest" or
    "sev_guest" (configfs-tsm's provider names).
    """

    provider: str
    public_key: bytes
    nonce: bytes
    report: bytes

    def to_json(self) -> dict[str, str]:
        return {
            "provider": self.provider,
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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed evidence: {exc}") from None


@dataclass(frozen=True)
class VerifiedEnclave:
    """An enclave that passed verification: provision weights for `public_key`."""

    public_key: bytes
    measurement: bytes
    provider: str
