"""What the server does with the model: generation from ids or embeddings, provisioning, linear ops.

The only piece of the server that touches the model. Every model call runs on one worker thread owned
by the service: steps of concurrent requests interleave (each has its own KV cache), torch's
thread-local modes stay on one thread, and on one CPU concurrent torch calls would only slow each other.
Close the service (or use it as a context manager) to stop the thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import torch
import torch.nn.functional as F

from veil.attest.envelope import WrapHeader
from veil.attest.evidence import Evidence
from veil.attest.verifier import Verifier
from veil.attest.wrap import wrap
from veil.model.generate import GenerationRequest, stream
from veil.model.loader import LoadedModel

T = TypeVar("T")
# The per-layer partition baseline's server side: a decoder layer's linear maps, and the output
# projection ("head", addressed as layer num_layers).
LINEAR_OPS = ("wqkv", "wo", "w_gate_up", "w_down", "head")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_prompt_tokens: int = 1024  # T of a prompt, ids or embeddings
    max_new_tokens: int = 256  # tokens generated per request
    max_body_bytes: int = 8 << 20  # any request body
    max_dim: int = 1 << 16  # any one dimension of a tensor in a request body

    @property
    def json_body_bytes(self) -> int:
        """A JSON body's limit: room for the longest prompt as text or as ids, never megabytes."""
        return max(64 << 10, 32 * self.max_prompt_tokens)


@dataclass(frozen=True)
class Token:
    token_id: int
    text: str
    compute_s: float  # model time spent producing this token on the server


class InferenceService:
    """The bundled (or a given) model behind the server's endpoints."""

    def __init__(self, loaded: LoadedModel, model_id: str, limits: Limits = Limits()) -> None:
        self.loaded = loaded
        self.model_id = model_id
        self.limits = limits
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="veil-model")
        self.compute_s = 0.0  # time spent inside model calls, for the benchmark's accounting
        # embeddings a client sends are rows of this table: nothing larger is a real prompt
        self.embedding_bound = float(loaded.model.embed_tokens.weight.detach().abs().max()) * 1.01

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> InferenceService:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _compute(self, fn: Callable[[], T]) -> tuple[T, float]:
        """Run `fn` on the model thread, in inference mode; the result and its time."""

        def timed() -> tuple[T, float]:
            started = time.perf_counter()
            with torch.inference_mode():
                result = fn()
            return result, time.perf_counter() - started

        result, elapsed = self._worker.submit(timed).result()
        self.compute_s += elapsed
        return result, elapsed

    @property
    def hidden_size(self) -> int:
        return self.loaded.config.hidden_size

    def stream_tokens(
        self,
        *,
        max_new_tokens: int,
        prompt_ids: list[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> Iterator[Token]:
        """Greedy generation from prompt ids (plain) or embeddings (CMIF), stopping at end of sequence."""
        request = GenerationRequest(
            max_new_tokens=max_new_tokens,
            prompt_ids=[prompt_ids] if prompt_ids is not None else None,
            prompt_embeds=prompt_embeds,
            stop_token_ids=self.loaded.config.eos_token_ids,
        )
        steps = stream(self.loaded.model, request)
        while True:
            step, elapsed = self._compute(lambda: next(steps, None))
            if step is None:
                return
            token_id = int(step[0])
            yield Token(token_id, self.loaded.tokenizer.decode([token_id]), elapsed)
            if token_id in self.loaded.config.eos_token_ids:
                return

    def provision(self, verifier: Verifier, evidence: Evidence, session: bytes = b"") -> bytes:
        """Verify `evidence` (raises `VerificationError`) and wrap the embedding table (and a session
        token) for its key. Takes about a second for a 100 MB table: call it off the event loop."""
        verified = verifier.verify(evidence)
        weights = self.loaded.model.embed_tokens.weight.detach()
        header = WrapHeader(
            self.model_id, tuple(weights.shape), verifier.policy.digest(), verified.measurement, verified.kem
        )
        return wrap(weights, verified.public_key, header, session=session)

    def linear(self, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        """One linear map of one decoder layer: the server half of the per-layer partition baseline."""
        if op not in LINEAR_OPS:
            raise ValueError(f"op must be one of {LINEAR_OPS}, got {op!r}")
        num_layers = self.loaded.config.num_layers
        if op == "head":
            if layer != num_layers:
                raise ValueError(f"the head is addressed as layer {num_layers}")
            weight = self.loaded.model.head_weight
        elif 0 <= layer < num_layers:
            weight = getattr(self.loaded.model.layers[layer].weights(), op)
        else:
            raise ValueError(f"layer must be in [0, {num_layers})")
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[-1] != weight.shape[1] or x.dtype != torch.float32:
            raise ValueError(f"input must be float32 of shape (1, T, {weight.shape[1]})")
        return self._compute(lambda: F.linear(x, weight))[0]
