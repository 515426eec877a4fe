"""Wrapping embedding weights for an attested enclave, and sealing them at rest.

Security contract:
- `wrap_weights` encrypts for one X25519 public key, HPKE-style (RFC 9180's shape, base mode, not its
  exact wire encoding): a fresh ephemeral key pair, DH with the recipient's key, HKDF-SHA256 over the
  shared secret with both public keys in `info`, then AES-256-GCM. Only the holder of the recipient's
  private key (the enclave) can unwrap.
- The header (model id, tensor shape and dtype, the policy digest, the measurement that was verified) is
  associated data: a changed header fails to unwrap. The server states which policy released the
  weights; the enclave checks the header says what it expects.
- Payloads are sealed in chunks of `CHUNK_BYTES` (AES-GCM's single-call limit is 2 GiB); chunk i uses
  nonce = base_nonce XOR i and associated data (header, i, is_last), so chunks cannot be reordered,
  dropped or truncated.
- Every failure to authenticate raises `VerificationError`, with no detail.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.attest.evidence import VerificationError

WRAP_MAGIC = b"VEILWRP1"
SEAL_MAGIC = b"VEILSEA1"
CHUNK_BYTES = 16 << 20
_TAG = 16
_INFO = b"veil-cmif-wrap-v1"


@dataclass(frozen=True)
class WrapHeader:
    """Public facts about wrapped weights; bound as associated data."""

    model_id: str
    shape: tuple[int, ...]  # (vocab, hidden)
    policy_digest: bytes
    measurement: bytes

    def encode(self) -> bytes:
        return json.dumps(
            {
                "model_id": self.model_id,
                "shape": list(self.shape),
                "dtype": "float32",
                "policy_digest": self.policy_digest.hex(),
                "measurement": self.measurement.hex(),
            },
            sort_keys=True,
        ).encode()

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
            )
        except (ValueError, KeyError, TypeError):
            raise VerificationError("malformed wrap header") from None


@dataclass(frozen=True)
class WrappedWeights:
    header: WrapHeader
    encapsulated_key: bytes  # the sender's ephemeral X25519 public key
    ciphertext: bytes

    def to_bytes(self) -> bytes:
        header = self.header.encode()
        return WRAP_MAGIC + struct.pack("<I", len(header)) + header + self.encapsulated_key + self.ciphertext

    @classmethod
    def from_bytes(cls, blob: bytes) -> WrappedWeights:
        if len(blob) < 12 or not blob.startswith(WRAP_MAGIC):
            raise VerificationError("not a wrapped-weights blob")
        (header_len,) = struct.unpack_from("<I", blob, 8)
        header_end = 12 + header_len
        if len(blob) < header_end + 32:
            raise VerificationError("truncated wrapped-weights blob")
        header = WrapHeader.decode(blob[12:header_end])
        return cls(header, blob[header_end : header_end + 32], blob[header_end + 32 :])


def wrap_weights(weights: torch.Tensor, recipient: bytes, header: WrapHeader) -> WrappedWeights:
    """Encrypt fp32 `weights` for the X25519 public key `recipient` (32 raw bytes)."""
    if weights.dtype != torch.float32 or tuple(weights.shape) != header.shape:
        raise ValueError(
            f"weights must be float32 of shape {header.shape}, got {weights.dtype} {tuple(weights.shape)}"
        )
    ephemeral = x25519.X25519PrivateKey.generate()
    encapsulated = _raw(ephemeral.public_key())
    shared = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(recipient))
    key, base_nonce = _schedule(shared, encapsulated, recipient)
    plaintext = tensor_bytes(weights)
    return WrappedWeights(header, encapsulated, seal_chunks(key, base_nonce, plaintext, header.encode()))


def unwrap_weights(wrapped: WrappedWeights, private_key: x25519.X25519PrivateKey) -> torch.Tensor:
    """The plaintext weights, or `VerificationError`. Call only inside the enclave."""
    recipient = _raw(private_key.public_key())
    try:
        shared = private_key.exchange(x25519.X25519PublicKey.from_public_bytes(wrapped.encapsulated_key))
    except ValueError:
        raise VerificationError("bad encapsulated key") from None
    key, base_nonce = _schedule(shared, wrapped.encapsulated_key, recipient)
    plaintext = open_chunks(key, base_nonce, wrapped.ciphertext, wrapped.header.encode())
    return tensor_from_bytes(plaintext, wrapped.header.shape)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Seal for storage at rest under a 32-byte sealing key; a fresh random base nonce per blob."""
    base_nonce = os.urandom(12)
    return SEAL_MAGIC + base_nonce + seal_chunks(key, base_nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < 20 or not blob.startswith(SEAL_MAGIC):
        raise VerificationError("not a sealed blob")
    return open_chunks(key, blob[8:20], blob[20:], aad)


def seal_chunks(key: bytes, base_nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    aead, view, out = AESGCM(key), memoryview(plaintext), []
    count = max(1, -(-len(plaintext) // CHUNK_BYTES))
    for index in range(count):
        chunk = view[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]
        out.append(aead.encrypt(_nonce(base_nonce, index), chunk, _chunk_aad(aad, index, index == count - 1)))
    return b"".join(out)


def open_chunks(key: bytes, base_nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    aead, view, out = AESGCM(key), memoryview(ciphertext), []
    step = CHUNK_BYTES + _TAG
    count = max(1, -(-len(ciphertext) // step))
    try:
        for index in range(count):
            chunk = view[index * step : (index + 1) * step]
            out.append(
                aead.decrypt(_nonce(base_nonce, index), chunk, _chunk_aad(aad, index, index == count - 1))
            )
    except (InvalidTag, ValueError):
        raise VerificationError("authentication failed") from None
    return b"".join(out)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor (this code assumes a little-endian host, as torch does)."""
    return tensor.detach().contiguous().cpu().numpy().tobytes()


def tensor_from_bytes(raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    expected = 4
    for n in shape:
        expected *= n
    if len(raw) != expected:
        raise VerificationError("payload size does not match the header")
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).view(shape)


def _schedule(shared: bytes, encapsulated: bytes, recipient: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(hashes.SHA256(), length=44, salt=None, info=_INFO + encapsulated + recipient).derive(shared)
    return okm[:32], okm[32:]


def _nonce(base: bytes, index: int) -> bytes:
    return (int.from_bytes(base, "big") ^ index).to_bytes(12, "big")


def _chunk_aad(aad: bytes, index: int, last: bool) -> bytes:
    return aad + struct.pack("<QB", index, last)


def _raw(key: x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
