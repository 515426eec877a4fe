"""Request bodies and the checks on them (sizes, lengths, types), apart from the endpoints."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field, ValidationError

from veil.server.service import Limits


class ApiError(Exception):
    """A client error: answered as `{"error": message}` with `status` (4xx), the server carries on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completions request that veil serves (greedy, one choice, no stream)."""

    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)

    @classmethod
    def parse(cls, raw: bytes, limits: Limits) -> CompletionRequest:
        """Parse a body already bounded by `limits.json_body_bytes`; 422 names what is wrong."""
        try:
            body = cls.model_validate_json(raw)
        except ValidationError as exc:
            raise ApiError(422, f"invalid request: {exc.errors(include_url=False)[:3]}") from None
        if body.max_tokens > limits.max_new_tokens:
            raise ApiError(400, f"max_tokens must be <= {limits.max_new_tokens}")
        return body

    def prompt_ids(self, tokenizer: Any, limits: Limits) -> list[int]:
        """Token ids of the prompt (tokenized here if text), checked against `limits`."""
        if self.max_tokens > limits.max_new_tokens:
            raise ApiError(400, f"max_tokens must be <= {limits.max_new_tokens}")
        if isinstance(self.prompt, str):
            ids = list(tokenizer(self.prompt, add_special_tokens=False)["input_ids"])
        else:
            ids = list(self.prompt)
        if not 1 <= len(ids) <= limits.max_prompt_tokens:
            raise ApiError(400, f"prompt must have 1..{limits.max_prompt_tokens} tokens, got {len(ids)}")
        if min(ids) < 0 or max(ids) >= len(tokenizer):
            raise ApiError(400, f"token ids must lie in [0, {len(tokenizer)})")
        return ids


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise ApiError(413, f"request body exceeds {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
