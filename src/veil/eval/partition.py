"""The baselines CMIF is measured against, in the same code and on the same model.

- plain: the prompt's token ids go to the server, which runs everything (`/v1/completions`). No
  protection at all.
- TEE-only: the whole model runs inside the client's enclave; nothing crosses the network.
- per-layer partition: the linear maps of every decoder layer run on the server, everything else
  (embedding, RMSNorm, RoPE, attention softmax, SwiGLU activation, residuals, sampling) in the enclave:
  four round trips per layer per step plus one for the output projection (none when the head is tied
  to the embeddings: the enclave holds those), as in the TEE+GPU split systems CMIF improves on.
  Hidden states cross in the clear, as the simplest such systems send them; blinding them
  (Slalom-style masks) would add work, not remove round trips. The server serves these linear maps
  only to an attested enclave's session.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import torch

from veil import wire
from veil.client import Meter
from veil.model.generate import GenerationRequest, generate
from veil.model.kv_cache import KVCache
from veil.model.llama import LayerWeights, StepContext, decoder_layer, rms_norm
from veil.model.loader import LoadedModel


@dataclass
class Result:
    token_ids: list[int]
    client_compute_s: float
    server_compute_s: float
    meter: Meter = field(default_factory=Meter)


def plain_generate(http: httpx.Client, prompt_ids: Sequence[int], *, max_tokens: int) -> Result:
    """Plain inference: token ids to `/v1/completions`."""
    meter = Meter()
    request = {"prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": 0}  # greedy
    body = httpx.Request("POST", "/", json=request).read()
    response = meter.post(http, "/v1/completions", body, "application/json").json()
    return Result(response["veil"]["token_ids"], 0.0, float(response["veil"]["server_compute_s"]), meter)


def tee_only_generate(loaded: LoadedModel, prompt_ids: Sequence[int], *, max_tokens: int) -> Result:
    """The whole model inside the client's enclave: all compute is client compute."""
    started = time.perf_counter()
    request = GenerationRequest(
        max_tokens, prompt_ids=[list(prompt_ids)], stop_token_ids=loaded.config.eos_token_ids
    )
    tokens = generate(loaded.model, request)[0]
    return Result(tokens, time.perf_counter() - started, 0.0)


class PartitionClient:
    """A generation `Runner` in the enclave that calls the server for every linear map.

    The client-side `loaded` model supplies only what the enclave holds in such a system: embeddings,
    norm weights and rotary tables; its linear weights are never used. `session` is the token the
    server wrapped for the attested enclave (`Enclave.session_token`); without it the server refuses.
    A head tied to the embedding table is computed here: the server never serves it.
    """

    def __init__(self, http: httpx.Client, loaded: LoadedModel, session: bytes) -> None:
        self.http, self.loaded = http, loaded
        self._authorization = f"Bearer {session.hex()}"
        self.meter = Meter()

    def generate(self, prompt_ids: Sequence[int], *, max_tokens: int) -> Result:
        self.meter = Meter()
        request = GenerationRequest(
            max_tokens, prompt_ids=[list(prompt_ids)], stop_token_ids=self.loaded.config.eos_token_ids
        )
        started = time.perf_counter()
        tokens = generate(self, request)
        elapsed = time.perf_counter() - started
        return Result(tokens[0], elapsed - self.meter.wait_s, 0.0, self.meter)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.loaded.model.embed(token_ids)

    def context(
        self, batch_size: int, seq_len: int, cache: KVCache | None, pad: torch.Tensor | None = None
    ) -> StepContext:
        return self.loaded.model.context(batch_size, seq_len, cache, pad)

    def new_cache(self, batch_size: int, max_tokens: int) -> KVCache:
        return self.loaded.model.new_cache(batch_size, max_tokens)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm in the enclave, output projection on the server."""
        model = self.loaded.model
        normed = rms_norm(hidden, model.norm_weight, self.loaded.config.rms_norm_eps)
        if self.loaded.config.tie_word_embeddings:
            return torch.nn.functional.linear(normed, model.embed_tokens.weight)
        return self._remote(self.loaded.config.num_layers, "head", normed)

    def run_layers(self, hidden: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Every decoder layer, split."""
        for index, layer in enumerate(self.loaded.model.layers):
            hidden = self._layer(hidden, layer.weights(), ctx, index)
        return hidden

    def _remote(self, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        body = wire.encode({"x": x})
        url = f"/v1/partition/{layer}/{op}"
        response = self.meter.post(self.http, url, body, wire.MEDIA_TYPE, self._authorization)
        return wire.decode(response.content, names=("y",), dtypes=frozenset({torch.float32}))["y"]

    def _layer(self, x: torch.Tensor, w: LayerWeights, ctx: StepContext, layer: int) -> torch.Tensor:
        """`veil.model.llama.decoder_layer` with each linear map computed by a server round trip."""

        def project(h: torch.Tensor, name: str) -> torch.Tensor:
            return self._remote(layer, name, h)

        return decoder_layer(x, w, ctx, layer, self.loaded.config, project)
