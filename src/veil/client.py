"""The CMIF client: attest and provision the enclave, then sanitize, embed and send one tensor.

Per request, in this order: tokenize (outside the enclave: the tokenizer is public), check the prompt
and `max_tokens` against the server's limits (a bad request is refused before anything is charged),
sanitize and embed inside the enclave, charge the sanitized prompt's epsilon to the accountant (a
refused charge raises `BudgetExceededError` and nothing is sent), send the embeddings once, read the
generated tokens as they stream back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

from veil import wire
from veil.enclave.enclave import Enclave
from veil.privacy.accountant import Accountant
from veil.privacy.sanitizer import SanitizedPrompt


@dataclass
class Meter:
    """Round trips and payload bytes on the wire (HTTP bodies; headers are not counted)."""

    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_s: float = 0.0  # time spent waiting on the server (network and server compute)

    def post(
        self, http: httpx.Client, url: str, body: bytes, content_type: str, authorization: str | None = None
    ) -> httpx.Response:
        """One request/response, both bodies counted; raises for an HTTP error status."""
        headers = {"content-type": content_type}
        if authorization is not None:
            headers["authorization"] = authorization
        started = time.perf_counter()
        response = http.post(url, content=body, headers=headers)
        self.wait_s += time.perf_counter() - started
        self.round_trips += 1
        self.bytes_sent += len(body)
        self.bytes_received += len(response.content)
        _raise_for_status(response)
        return response


@dataclass
class Answer:
    token_ids: list[int]
    text: str
    finish_reason: str
    sanitized: SanitizedPrompt
    client_compute_s: float  # sanitizing and embedding, inside the enclave
    server_compute_s: float  # as reported by the server
    meter: Meter = field(default_factory=Meter)


class ServerError(Exception):
    """The server answered with an error status; `status` and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server error {status}: {message}")
        self.status = status


class CmifClient:
    """Talks to a veil server for one enclave. `http` is an `httpx.Client` the caller owns."""

    def __init__(
        self,
        http: httpx.Client,
        enclave: Enclave,
        tokenizer: Any,
        *,
        accountant: Accountant | None = None,
        principal: str = "default",
    ) -> None:
        self.http, self.enclave, self.tokenizer = http, enclave, tokenizer
        self.accountant, self.principal = accountant, principal
        self._limits: dict[str, int] | None = None

    def provision(self, *, use_sealed: bool = True) -> None:
        """Load sealed weights, or attest to the server and install the weights it wraps for us.
        Also reads the server's request limits, so `generate` can check a request before charging."""
        self._read_limits()
        if use_sealed and self.enclave.load_sealed():
            return
        challenge = self.http.post("/v1/cmif/challenge")
        _raise_for_status(challenge)
        evidence = self.enclave.evidence(bytes.fromhex(challenge.json()["nonce"]))
        response = self.http.post("/v1/cmif/provision", json=evidence.to_json())
        _raise_for_status(response)
        self.enclave.install(response.content)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 16,
        on_token: Callable[[int, str], None] | None = None,
        sanitize: bool = True,
    ) -> Answer:
        """Generate for `prompt` (text, or token ids); `on_token` sees each token as it arrives.

        The request is checked against the server's limits first; the epsilon is charged only once the
        embeddings are ready to go, just before they are sent (charge-before-send).

        Raises:
            ValueError: an empty or too long prompt, or `max_tokens` outside the server's limits; nothing
                was charged or sent.
            BudgetExceededError: the sanitized prompt's epsilon exceeds the remaining budget (or is
                unbounded); nothing was sent.
            ServerError: the server refused the request.
        """
        ids = (
            self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if isinstance(prompt, str)
            else list(prompt)
        )
        self._check(len(ids), max_tokens)
        started = time.perf_counter()
        sanitized = self.enclave.sanitize(ids) if sanitize else SanitizedPrompt(tuple(ids), (), 0.0)
        embeds = self.enclave.embed(torch.tensor([sanitized.token_ids]))
        body = wire.encode({"embeddings": embeds})
        client_s = time.perf_counter() - started
        if self.accountant is not None:
            self.accountant.charge(self.principal, sanitized.epsilon_spent)
        return self._stream(body, max_tokens, sanitized, client_s, on_token)

    def _check(self, num_tokens: int, max_tokens: int) -> None:
        """The server's limits, checked before anything is charged."""
        if self._limits is None:
            self._read_limits()
        assert self._limits is not None
        max_prompt = int(self._limits.get("max_prompt_tokens", num_tokens))
        max_new = int(self._limits.get("max_new_tokens", max_tokens))
        if not 1 <= num_tokens <= max_prompt:
            raise ValueError(f"the prompt must have 1..{max_prompt} tokens, it has {num_tokens}")
        if not 1 <= max_tokens <= max_new:
            raise ValueError(f"max_tokens must be in 1..{max_new} on this server, got {max_tokens}")

    def _read_limits(self) -> None:
        response = self.http.get("/health")
        _raise_for_status(response)
        self._limits = dict(response.json().get("limits", {}))

    def _stream(
        self,
        body: bytes,
        max_tokens: int,
        sanitized: SanitizedPrompt,
        client_s: float,
        on_token: Callable[[int, str], None] | None,
    ) -> Answer:
        meter = Meter(round_trips=1, bytes_sent=len(body))
        tokens: list[int] = []
        texts: list[str] = []
        done: dict[str, Any] = {}
        headers = {"content-type": wire.MEDIA_TYPE}
        with self.http.stream(
            "POST", f"/v1/cmif/generate?max_tokens={max_tokens}", content=body, headers=headers
        ) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for_status(r)
            for line in r.iter_lines():
                meter.bytes_received += len(line) + 1
                event = json.loads(line)
                if event.get("done"):
                    done = event
                    break
                tokens.append(int(event["token_id"]))
                texts.append(event["text"])
                if on_token is not None:
                    on_token(tokens[-1], texts[-1])
        if not done:
            raise ServerError(502, "the token stream ended without its final record")
        return Answer(
            tokens,
            "".join(texts),
            str(done["finish_reason"]),
            sanitized,
            client_s,
            float(done["server_compute_s"]),
            meter,
        )


def _raise_for_status(response: httpx.Response) -> None:
    """`ServerError` with the message of the server's error object (`{"error": {"message": ...}}`)."""
    if response.status_code >= 400:
        try:
            error = response.json().get("error", response.text)
        except (ValueError, AttributeError):
            error = response.text
        message = error.get("message", error) if isinstance(error, dict) else error
        raise ServerError(response.status_code, str(message))
