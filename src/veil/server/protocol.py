"""Reading request bodies: size-checked while they are read, before anything parses them."""

from __future__ import annotations

from fastapi import Request

from veil.server.errors import ApiError


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise ApiError(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
