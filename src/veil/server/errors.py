"""API errors in OpenAI's error-object shape, for every endpoint of the server.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}` with the HTTP status: 4xx for
the client's mistakes (the server carries on), 503 when the engine stopped. `type` follows the status
(OpenAI's SDKs dispatch on the status alone); `param` names the offending request field and `code` a
machine-readable reason, where there is one. Messages never carry secrets: verification failures say
only that.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A refusal answered with `status` and an OpenAI error object (see the module docstring)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status >= 500:
            return "server_error"
        return "invalid_request_error"

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)
