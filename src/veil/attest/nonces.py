"""Challenge nonces that cost the verifier no state until they are used.

Security contract:
- A nonce is 32 bytes: an 8-byte expiry time, 8 random bytes, and the first 16 bytes of
  HMAC-SHA256(key, expiry || random) under a key that never leaves this object. Issuing one stores
  nothing, so no number of unauthenticated challenge requests can exhaust anything or lock a
  legitimate enclave out.
- `check` accepts a nonce only if its MAC verifies, it has not expired, and it has not been `consume`d;
  `consume` records a nonce that passed a whole verification, until its expiry. That set grows only with
  successful attestations (each needs a genuine report), and is bounded by `max_consumed` (refusing new
  attestations, never accepting a replay, when full).
- Failures raise `VerificationError` (opaque; `reason` is for logs).
- Time and randomness enter through the `clock` and `random` seams so tests can fix them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import threading
import time
from collections.abc import Callable

from veil.attest.evidence import NONCE_SIZE, VerificationError

_MAC_BYTES = 16


class NonceStore:
    """Stateless one-time nonces with expiry. Thread-safe."""

    def __init__(
        self,
        ttl_s: float = 60.0,
        *,
        max_consumed: int = 100_000,
        clock: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
        self.ttl_s = ttl_s
        self._max_consumed = max_consumed
        self._clock, self._random = clock, random
        self._key = random(32)
        self._consumed: dict[bytes, float] = {}  # nonce -> expiry
        self._lock = threading.Lock()

    def issue(self) -> bytes:
        body = struct.pack("<d", self._clock() + self.ttl_s) + self._random(8)
        nonce = body + self._mac(body)
        assert len(nonce) == NONCE_SIZE
        return nonce

    def check(self, nonce: bytes) -> None:
        """Raise `VerificationError` unless `nonce` was issued here, is unexpired and unused."""
        if len(nonce) != NONCE_SIZE or not hmac.compare_digest(nonce[16:], self._mac(nonce[:16])):
            raise VerificationError("unknown nonce")
        if self._clock() > struct.unpack("<d", nonce[:8])[0]:
            raise VerificationError("expired nonce")
        with self._lock:
            if nonce in self._consumed:
                raise VerificationError("replayed nonce")

    def consume(self, nonce: bytes) -> None:
        """Check `nonce` and mark it used (call once a verification has succeeded)."""
        self.check(nonce)
        expiry = struct.unpack("<d", nonce[:8])[0]
        with self._lock:
            now = self._clock()
            for old in [n for n, e in self._consumed.items() if now > e]:
                del self._consumed[old]
            if nonce in self._consumed:
                raise VerificationError("replayed nonce")
            if len(self._consumed) >= self._max_consumed:
                raise VerificationError("too many recent attestations")
            self._consumed[nonce] = expiry

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]
