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
- Every failure to open (`veil.enclave.keys.RecipientKey.open`) raises `VerificationError`, with no
  detail. This module is the server's half and is not part of the enclave's measurement.
- Limit: single-shot AES-GCM takes at most 2**31 - 1 bytes, so tables up to 2 GiB (Llama-2-7B's is
  0.5 GiB; Llama-3-8B's fp32 table, 2.1 GiB, would need chunking or bf16).
"""

from __future__ import annotations

import torch
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from veil import wire
from veil.attest.envelope import INFO_LABEL, PAYLOAD, SESSION, WrapHeader, join_blob, suite, u8
from veil.attest.evidence import Kem

_X25519_BYTES = 32
PublicKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey


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


def wrap(weights: torch.Tensor, recipient: bytes, header: WrapHeader, *, session: bytes = b"") -> bytes:
    """Encrypt fp32 `weights` (and a session token) for the raw public key `recipient` of `header.kem`."""
    if weights.dtype != torch.float32 or tuple(weights.shape) != header.shape:
        raise ValueError(
            f"weights must be float32 of shape {header.shape}, got {weights.dtype} {tuple(weights.shape)}"
        )
    public_key = load_public_key(header.kem, recipient)
    header_bytes = header.encode()
    plaintext = wire.encode({PAYLOAD: weights, SESSION: u8(session)})
    ciphertext = suite(header.kem).encrypt(plaintext, public_key, info=INFO_LABEL + header_bytes)
    return join_blob(header_bytes, ciphertext)
