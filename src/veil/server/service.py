"""What the server does with the model: generation from ids or embeddings, provisioning, linear ops.

The only piece of the server that touches the model. Generation runs on the serving engine
(`veil.engine`), on its own thread (`EngineLoop`): concurrent requests, from token ids or from
split-inference embeddings, are batched continuously by one engine over a paged KV cache on the
emulated confidential device, and its transport (`plain`, `cc`, `pipellm`) carries every weight upload
and KV swap. The per-layer partition baseline's linear maps run on the same thread, between steps.
Close the service (or use it as a context manager) to stop the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

import torch
import torch.nn.functional as F
from starlette.concurrency import run_in_threadpool

from veil.attest.envelope import WrapHeader
from veil.attest.evidence import Evidence
from veil.attest.verifier import Verifier
from veil.attest.wrap import wrap
from veil.engine.engine import EngineConfig, EngineStats, LLMEngine, RequestOutput
from veil.engine.loop import EngineLoop, EngineStopped, LoopStats
from veil.lora.adapter import Adapter
from veil.model.loader import LoadedModel
from veil.model.sampling import SamplingParams
from veil.server.detokenize import IncrementalDetokenizer
from veil.transport.base import TransportStats

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
    text: str  # the text this token completes (may be empty while a multi-byte character is split)
    compute_s: float  # this request's share of the engine steps that produced the token
    finish_reason: str | None = None  # on the request's last token: "stop", "length"


@dataclass(frozen=True)
class ServiceStats:
    """A consistent snapshot of the engine's, its loop's and its transport's counters."""

    running: bool
    engine: EngineStats
    loop: LoopStats
    transport: TransportStats | None  # None once the engine stopped
    free_device_blocks: int | None  # None once the engine stopped


class _AsyncSink:
    """Outputs of one request, from the engine's thread into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[tuple[RequestOutput, float] | BaseException] = asyncio.Queue()

    def put(self, output: RequestOutput, compute_s: float) -> None:
        self._deliver((output, compute_s))

    def fail(self, error: BaseException) -> None:
        self._deliver(error)

    def _deliver(self, item: tuple[RequestOutput, float] | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)


class InferenceService:
    """The bundled (or a given) model behind the server's endpoints, served by one engine.

    Use as a context manager: entering starts the engine (device, transport, weights upload).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        model_id: str,
        limits: Limits = Limits(),
        engine: EngineConfig | None = None,
    ) -> None:
        self.loaded = loaded
        self.model_id = model_id
        self.limits = limits
        self.engine = LLMEngine(loaded.model, engine, eos_token_ids=loaded.stop_token_ids)
        self.loop = EngineLoop(self.engine)
        # embeddings a client sends are rows of this table: nothing larger is a real prompt
        self.embedding_bound = float(loaded.model.embed_tokens.weight.detach().abs().max()) * 1.01

    def __enter__(self) -> InferenceService:
        self.loop.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.loop.close()

    @property
    def compute_s(self) -> float:
        """Seconds the engine spent in steps since it started (read without waiting for a step: for
        differences over a run, as `veil bench split` takes them)."""
        return self.loop.stats.busy_s

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        """Serve a LoRA adapter under `name` (requests select it by their `model` field).

        Raises:
            ValueError: if the engine has no adapter slots, the name is taken or is the base model's,
                or the adapter does not fit the model or the slots (`AdapterError`).
        """
        if name == self.model_id:
            raise ValueError(f"adapter name {name!r} is the base model's name")
        self.loop.call(lambda: self.engine.add_adapter(name, adapter))

    @property
    def adapters(self) -> tuple[str, ...]:
        """Names of the LoRA adapters served beside the base model."""
        return self.engine.adapters

    @property
    def hidden_size(self) -> int:
        return self.loaded.config.hidden_size

    async def generate(
        self,
        params: SamplingParams,
        *,
        prompt_ids: list[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[Token]:
        """Tokens of one request, from prompt ids (plain) or embeddings (1, T, hidden) (CMIF), as the
        engine produces them. Leaving the iteration early (a client gone) aborts the request and frees
        its KV blocks.

        Raises:
            ValueError: if the engine refuses the request (a prompt that can never fit, bad ids).
            EngineStopped: if the engine stopped (before or during the request).
        """
        sink = _AsyncSink(asyncio.get_running_loop())
        embeds = None if prompt_embeds is None else prompt_embeds[0]
        request_id = await run_in_threadpool(
            self.loop.submit, sink, prompt_ids, params, prompt_embeds=embeds, adapter=adapter
        )
        detokenizer = IncrementalDetokenizer(self.loaded.tokenizer)
        finished = False
        try:
            while not finished:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                output, compute_s = item
                finished = output.finished
                for token_id in output.new_token_ids:
                    text = detokenizer.add(token_id) + (detokenizer.flush() if finished else "")
                    reason = output.finish_reason.value if finished and output.finish_reason else None
                    yield Token(token_id, text, compute_s, reason)
        finally:
            if not finished:
                self.loop.abort(request_id)

    def stats(self) -> ServiceStats:
        """The counters, read between engine steps (blocks until then); once the engine stopped, the
        counters it left (no transport)."""

        def read() -> ServiceStats:
            return ServiceStats(
                True,
                copy.deepcopy(self.engine.stats),
                copy.deepcopy(self.loop.stats),
                self.engine.runner.transport.stats(),
                self.engine.block_manager.device.num_free,
            )

        try:
            return self.loop.call(read)
        except EngineStopped:
            return ServiceStats(
                False, copy.deepcopy(self.engine.stats), copy.deepcopy(self.loop.stats), None, None
            )

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
        """One linear map of one decoder layer: the server half of the per-layer partition baseline.
        Runs on the engine's thread between steps (blocks until then)."""
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
        return self.loop.call(lambda: F.linear(x, weight))
