"""Offline batch generation in the style of vLLM: `LLM(...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tqdm.auto import tqdm

from veil.engine.engine import EngineConfig, LLMEngine
from veil.engine.request import FinishReason
from veil.model.loader import LoadedModel, load_model
from veil.model.sampling import SamplingParams


@dataclass(frozen=True)
class Completion:
    """One prompt's result."""

    prompt_token_ids: list[int]
    token_ids: list[int]  # generated, the stop token included when one ended it
    text: str  # the generated tokens decoded, special tokens skipped
    finish_reason: FinishReason


class LLM:
    """A loaded model served by an `LLMEngine`. A context manager, like the engine it owns.

    Args:
        model: a local Hugging Face Llama checkpoint directory; None for the bundled model.
        config: engine settings (transport, KV blocks, budgets).
    """

    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None) -> None:
        self.loaded: LoadedModel = load_model(model, progress=False)
        self.engine = LLMEngine(self.loaded.model, config, eos_token_ids=self.loaded.stop_token_ids)

    def __enter__(self) -> LLM:
        self.engine.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.engine.close()

    def generate(
        self,
        prompts: Sequence[str] | Sequence[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[Completion]:
        """Generate for every prompt (text or token ids), batched continuously; results in prompt order.

        Raises:
            ValueError: if `params` is a list of another length than `prompts`, or a prompt can never
                fit in the KV cache.
        """
        per_prompt = _per_prompt(params, len(prompts))
        ids = [self._token_ids(p) for p in prompts]
        request_ids = self._add_all(ids, per_prompt)
        generated: dict[int, list[int]] = {r: [] for r in request_ids}
        reasons: dict[int, FinishReason] = {}
        with tqdm(total=len(prompts), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    generated[out.request_id] += out.new_token_ids
                    if out.finish_reason is not None:
                        reasons[out.request_id] = out.finish_reason
                        bar.update(1)
        return [self._completion(p, generated[r], reasons[r]) for p, r in zip(ids, request_ids, strict=True)]

    def _add_all(self, ids: list[list[int]], params: list[SamplingParams]) -> list[int]:
        """Queue every prompt, or none: a rejected prompt aborts the ones queued before it."""
        request_ids: list[int] = []
        try:
            for prompt, sp in zip(ids, params, strict=True):
                request_ids.append(self.engine.add_request(prompt, sp))
        except ValueError:
            for request_id in request_ids:
                self.engine.abort(request_id)
            raise
        return request_ids

    def _token_ids(self, prompt: str | list[int]) -> list[int]:
        return list(self.loaded.tokenizer(prompt).input_ids) if isinstance(prompt, str) else list(prompt)

    def _completion(self, prompt: list[int], tokens: list[int], reason: FinishReason) -> Completion:
        text = self.loaded.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(prompt, tokens, text, reason)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
    return list(params)
