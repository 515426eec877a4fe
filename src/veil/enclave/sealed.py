"""The enclave's weights sealed at rest, with a monotonic version against rollback.

Security contract:
- `store` seals a safetensors payload with AES-256-GCM under the platform's sealing key, a fresh random
  96-bit nonce per blob, and associated data = the enclave's configuration || the blob's version. The
  blob is a safetensors message: `nonce` (12 bytes), `version` (int64) and `ciphertext`.
- Each `store` takes the next version from a counter kept beside the blob; `load` refuses a blob whose
  version is below the counter (an older sealed file put back: rollback) or whose tag does not verify,
  with `VerificationError`. A blob ahead of the counter (a crash between writing the blob and the
  counter) is accepted and the counter catches up.
- What this does not stop: neither backend has a hardware monotonic counter, so the counter is a file
  too, and an attacker who restores the counter *and* the blob from one older snapshot rolls back
  both. It stops a lone stale blob (a backup restored, a copy from another run).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil import wire
from veil.attest.evidence import VerificationError

_NONCE_BYTES = 12
PAYLOAD = "embed_tokens"


class SealedWeights:
    """One sealed weight file and its version counter (`path` and `path` + ".version")."""

    def __init__(self, path: Path, key: bytes, aad: bytes) -> None:
        if len(key) != 32:
            raise ValueError(f"the sealing key must be 32 bytes, got {len(key)}")
        self.path = path
        self._counter = path.with_name(path.name + ".version")
        self._aead = AESGCM(key)
        self._aad = aad

    def exists(self) -> bool:
        return self.path.exists()

    def store(self, weights: torch.Tensor) -> int:
        """Seal `weights` under the next version; returns that version."""
        version = max(self._counter_value(), self._blob_version()) + 1
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = self._aead.encrypt(nonce, wire.encode({PAYLOAD: weights}), self._aad_for(version))
        blob = wire.encode(
            {
                "nonce": _u8(nonce),
                "version": torch.tensor([version], dtype=torch.int64),
                "ciphertext": _u8(ciphertext),
            }
        )
        _atomic_write(self.path, blob)
        _atomic_write(self._counter, str(version).encode())
        return version

    def load(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The sealed weights of `shape`, or `VerificationError` (tampered, rolled back, sealed elsewhere)."""
        nonce, version, ciphertext = self._read()
        if version < self._counter_value():
            raise VerificationError("sealed state older than its counter (rollback)")
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, self._aad_for(version))
            weights = wire.decode(plaintext, names=(PAYLOAD,), dtypes=frozenset({torch.float32}))[PAYLOAD]
        except (InvalidTag, ValueError):
            raise VerificationError("sealed state failed to authenticate") from None
        if tuple(weights.shape) != shape:
            raise VerificationError("sealed weights of another shape")
        if version > self._counter_value():
            _atomic_write(self._counter, str(version).encode())
        return weights

    def _read(self) -> tuple[bytes, int, bytes]:
        try:
            parts = wire.decode(self.path.read_bytes(), names=("nonce", "version", "ciphertext"))
        except wire.WireFormatError:
            raise VerificationError("not a sealed-state file") from None
        nonce, version = parts["nonce"], parts["version"]
        if nonce.dtype != torch.uint8 or nonce.numel() != _NONCE_BYTES or version.dtype != torch.int64:
            raise VerificationError("not a sealed-state file")
        return nonce.numpy().tobytes(), int(version[0]), parts["ciphertext"].numpy().tobytes()

    def _blob_version(self) -> int:
        try:
            return self._read()[1] if self.path.exists() else 0
        except VerificationError:
            return 0

    def _counter_value(self) -> int:
        try:
            text = self._counter.read_text()
        except FileNotFoundError:
            return 0
        if not text.isdigit():
            raise VerificationError("corrupt sealed-state counter")
        return int(text)

    def _aad_for(self, version: int) -> bytes:
        return self._aad + version.to_bytes(8, "little")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _u8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
