"""The provisioning envelope both sides agree on: the HPKE suite, the public header bound as HPKE
`info`, and the blob's layout. The sealing is in `veil.attest.wrap` (server), the opening in
`veil.enclave.keys` (enclave); see `veil.attest.wrap` for the security contract.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives import hpke

from veil import wire
from veil.attest.evidence import Kem, VerificationError

INFO_LABEL = b"veil-cmif-wrap-v2\0"
PAYLOAD = "embed_tokens"  # the float32 (vocab, hidden) table inside the plaintext
SESSION = "session"  # the server's session token inside the plaintext (uint8, may be empty)


def suite(kem: Kem) -> hpke.Suite:
    """The HPKE suite of `kem`: its KEM, HKDF-SHA256, AES-256-GCM."""
    chosen = hpke.KEM.X25519 if kem is Kem.X25519 else hpke.KEM.MLKEM768_X25519
    return hpke.Suite(chosen, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


@dataclass(frozen=True)
class WrapHeader:
    """Public facts about wrapped weights; bound as HPKE `info`."""

    model_id: str
    shape: tuple[int, ...]  # (vocab, hidden)
    policy_digest: bytes
    measurement: bytes
    kem: Kem = Kem.X25519

    def encode(self) -> bytes:
        fields = {
            "model_id": self.model_id,
            "shape": list(self.shape),
            "dtype": "float32",
            "policy_digest": self.policy_digest.hex(),
            "measurement": self.measurement.hex(),
            "kem": self.kem.value,
        }
        return json.dumps(fields, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> WrapHeader:
        try:
            obj = json.loads(raw)
            if obj["dtype"] != "float32":
                raise ValueError("dtype")
            return cls(
                str(obj["model_id"]),
                tuple(int(n) for n in obj["shape"]),
                bytes.fromhex(obj["policy_digest"]),
                bytes.fromhex(obj["measurement"]),
                Kem(obj["kem"]),
            )
        except (ValueError, KeyError, TypeError):
            raise VerificationError("malformed wrap header") from None


def join_blob(header: bytes, ciphertext: bytes) -> bytes:
    """The blob sent to the enclave: a safetensors message of `header` and `ciphertext` (uint8)."""
    return wire.encode({"header": u8(header), "ciphertext": u8(ciphertext)})


def split_blob(blob: bytes) -> tuple[bytes, bytes]:
    """(header, ciphertext) of a blob, or `VerificationError`."""
    try:
        parts = wire.decode(blob, names=("header", "ciphertext"), dtypes=frozenset({torch.uint8}))
    except wire.WireFormatError:
        raise VerificationError("not a wrapped-weights blob") from None
    return parts["header"].numpy().tobytes(), parts["ciphertext"].numpy().tobytes()


def u8(data: bytes) -> torch.Tensor:
    """Bytes as a uint8 tensor (for safetensors)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
