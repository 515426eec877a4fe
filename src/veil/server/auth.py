"""The server's API key: `Authorization: Bearer <key>`, as OpenAI's clients send it.

With a key set (`veil serve --api-key` or `VEIL_API_KEY`), every `/v1` endpoint needs it except the
per-layer partition endpoints, whose `Authorization` header carries the attested session token instead
(a token the enclave received through the keyed `/v1/cmif/provision`). `/health` and `/metrics` stay
open. Without a key, nothing is checked.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Request

from veil.server.errors import ApiError


def api_key_check(key: str | None) -> Callable[[Request], None]:
    """A FastAPI dependency refusing requests without `key` (401); a no-op if `key` is None."""
    if key is not None and not key:
        raise ValueError("the API key must not be empty")
    expected = None if key is None else key.encode()

    def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise ApiError(
                401,
                "this server needs an API key: send 'Authorization: Bearer <key>'",
                code="missing_api_key",
            )
        if not hmac.compare_digest(header.removeprefix("Bearer ").strip().encode(), expected):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    return check
