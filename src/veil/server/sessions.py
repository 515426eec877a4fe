"""Sessions of attested enclaves, for the per-layer partition baseline's endpoints.

A session token is 32 random bytes that the server puts *inside* the HPKE-wrapped payload it provisions
(`veil.attest.wrap`), so only the attested enclave learns it; the enclave then sends it as
`Authorization: Bearer <hex>` with each partition request. Tokens expire, and the store is bounded
(the oldest session is dropped when full). Time and randomness are injectable seams.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

TOKEN_BYTES = 32


class SessionStore:
    """Tokens of enclaves that passed attestation. Thread-safe."""

    def __init__(
        self,
        ttl_s: float = 3600.0,
        max_sessions: int = 10_000,
        *,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.ttl_s, self._max = ttl_s, max_sessions
        self._clock, self._random = clock, random
        self._expiry: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def new_token(self) -> bytes:
        """A fresh token; it becomes valid only once `admit`ted (after a successful provisioning)."""
        return self._random(TOKEN_BYTES)

    def admit(self, token: bytes) -> None:
        with self._lock:
            self._expiry[token] = self._clock() + self.ttl_s
            while len(self._expiry) > self._max:
                self._expiry.popitem(last=False)

    def valid(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header names a live session."""
        if not authorization or not authorization.startswith("Bearer "):
            return False
        try:
            token = bytes.fromhex(authorization.removeprefix("Bearer ").strip())
        except ValueError:
            return False
        with self._lock:  # a hash lookup: its timing does not reveal a token's bytes one by one
            expiry = self._expiry.get(token)
        return expiry is not None and self._clock() <= expiry
