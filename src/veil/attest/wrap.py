"""Provisioning: the embedding weights wrapped for one attested enclave key, with RFC 9180 HPKE.

Security contract:
- `wrap` encrypts for the enclave's public key with `cryptography`'s single-shot HPKE (RFC 9180, base
  mode): by default DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM; with `Kem.MLKEM768_X25519`
  the hybrid post-quantum KEM (ML-KEM-768 + X25519) in place of DHKEM(X25519). Nothing of the key
  schedule is written here.
- The plaintext is a safetensors message holding one float32 tensor `embed_tokens` (vocab, hidden) and
  one uint8 tensor `session`: a server token only the enclave learns (empty when the server has no
  session endpoints; see `veil.server.sessions`).
- The public header (model id, shape, dtype, policy digest, verified measurement, KEM) is HPKE's `info`,
  so it is bound into the key schedule: a changed header fails to open.
- The blob itself is a safetensors message of two uint8 tensors, `header` (canonical JSON) and
  `ciphertext` (HPKE's enc || ct).
- Every failure to open raises `VerificationError`, with no detail.
- Limit: single-shot AES-GCM takes at most 2**31 - 1 bytes, so tables up to 2 GiB (Llama-2-7B's is
  0.5 GiB; Llama-3-8B's fp32 table, 2.1 GiB, would need chunking or bf16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from veil import wire
from veil.attest.evidence import Kem, VerificationError

_INFO_LABEL = b"veil-cmif-wrap-v2\0"
_X25519_BYTES = 32
PAYLOAD = "embed_tokens"


def suite(kem: Kem) -> hpke.Suite:
    """The HPKE suite of `kem`: its KEM, HKDF-SHA256, AES-256-GCM."""
    chosen = hpke.KEM.X25519 if kem is Kem.X25519 else hpke.KEM.MLKEM768_X25519
    return hpke.Suite(chosen, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


PublicKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
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
        header_bytes, ciphertext = _split(blob)
        header = WrapHeader.decode(header_bytes)
        if header.kem is not self.kem:
            raise VerificationError("wrapped for another KEM")
        try:
            plaintext = suite(self.kem).decrypt(ciphertext, self._private(), info=_INFO_LABEL + header_bytes)
            parts = wire.decode(plaintext, names=(PAYLOAD, "session"))
        except (InvalidTag, ValueError):
            raise VerificationError("authentication failed") from None
        weights, session = parts[PAYLOAD], parts["session"]
        if weights.dtype != torch.float32 or tuple(weights.shape) != header.shape:
            raise VerificationError("payload does not match its header")
        return header, weights, session.numpy().tobytes()


def load_public_key(kem: Kem, raw: bytes) -> PublicKey:
    """Parse a raw public key of `kem`; `ValueError` names the constraint."""
    if len(raw) != kem.public_key_size:
        raise ValueError(f"a {kem.value} public key is {kem.public_key_size} bytes, got {len(raw)}")
    classic = x25519.X25519PublicKey.from_public_bytes(raw[-_X25519_BYTES:])
    if kem is Kem.X25519:
        return classic
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(raw[:-_X25519_BYTES]), classic
    )


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


def wrap(weights: torch.Tensor, recipient: bytes, header: WrapHeader, *, session: bytes = b"") -> bytes:
    """Encrypt fp32 `weights` (and a session token) for the raw public key `recipient` of `header.kem`."""
    if weights.dtype != torch.float32 or tuple(weights.shape) != header.shape:
        raise ValueError(
            f"weights must be float32 of shape {header.shape}, got {weights.dtype} {tuple(weights.shape)}"
        )
    public_key = load_public_key(header.kem, recipient)
    header_bytes = header.encode()
    plaintext = wire.encode({PAYLOAD: weights, "session": _u8(session)})
    ciphertext = suite(header.kem).encrypt(plaintext, public_key, info=_INFO_LABEL + header_bytes)
    return wire.encode({"header": _u8(header_bytes), "ciphertext": _u8(ciphertext)})


def _split(blob: bytes) -> tuple[bytes, bytes]:
    try:
        parts = wire.decode(blob, names=("header", "ciphertext"), dtypes=frozenset({torch.uint8}))
    except wire.WireFormatError:
        raise VerificationError("not a wrapped-weights blob") from None
    return parts["header"].numpy().tobytes(), parts["ciphertext"].numpy().tobytes()


def _u8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
