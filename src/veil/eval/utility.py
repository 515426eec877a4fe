"""The two utility measures of the privacy evaluation.

A: zero-shot sentiment with the bundled SmolLM2: the sanitized sentence's tokens are spliced into a
   fixed chat prompt and the next-token logits of " positive" and " negative" are compared. The decision
   threshold on their difference is calibrated once on clean training sentences (their median, as the
   classes are balanced) and then shared by every mechanism.
B: the SanText/CusText protocol: a frozen all-MiniLM-L6-v2 encoder (`veil.privacy.encoder`: mean
   pooling, unit rows, as sentence-transformers ships it) plus logistic regression trained on sanitized
   training sentences and tested on sanitized test sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

PROMPT_PREFIX = "<|im_start|>user\nIs the sentiment of this movie review positive or negative?\nReview: "
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\nThe sentiment of the review is"
Progress = Callable[[int, int], None]


class ZeroShot:
    """Scores token sequences with the difference of the " positive" and " negative" logits.

    The prompt's fixed prefix is run once and its keys/values are reused by every batch; each batch runs
    only its sentences and the suffix, right-padded (causal attention: padding after a row's last real
    token never reaches it). Scores are memoized per sentence (a deterministic function of its tokens),
    so a sentence a mechanism left unchanged is not scored again.
    """

    def __init__(
        self,
        model: Any,
        *,
        prefix: Sequence[int],
        suffix: Sequence[int],
        positive: int,
        negative: int,
        pad: int = 0,
        batch_size: int = 32,
    ) -> None:
        if not prefix or not suffix:
            raise ValueError("the prompt needs a non-empty prefix and suffix")
        self._model = model
        self._prefix, self._suffix = list(prefix), list(suffix)
        self._positive, self._negative, self._pad = positive, negative, pad
        self._batch_size = batch_size
        self._prefix_kv = self._run_prefix()
        self._memo: dict[tuple[int, ...], float] = {}
        self.threshold = 0.0

    @classmethod
    def for_model(cls, loaded: Any, *, batch_size: int = 32) -> ZeroShot:
        """The sentiment prompt of this module for a `veil.model.loader.LoadedModel`."""
        tokenizer = loaded.tokenizer
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        return cls(
            loaded.model,
            prefix=encode(PROMPT_PREFIX),
            suffix=encode(PROMPT_SUFFIX),
            positive=encode(" positive")[0],
            negative=encode(" negative")[0],
            pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            batch_size=batch_size,
        )

    def scores(self, sentences: Sequence[Sequence[int]], progress: Progress | None = None) -> np.ndarray:
        """logit(" positive") - logit(" negative") after each sentence's prompt."""
        keys = [tuple(int(t) for t in s) for s in sentences]
        todo = list(dict.fromkeys(k for k in keys if k not in self._memo))
        order = np.argsort([len(k) for k in todo], kind="stable")  # batch similar lengths together
        for start in range(0, len(todo), self._batch_size):
            chosen = [todo[i] for i in order[start : start + self._batch_size]]
            self._memo.update(zip(chosen, self._batch(chosen).tolist()))
            if progress is not None:
                progress(min(start + self._batch_size, len(todo)), len(todo))
        return np.array([self._memo[k] for k in keys], dtype=np.float64)

    @torch.inference_mode()
    def _run_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prefix, (layers, 1, kv_heads, P, head_dim) each."""
        cache = self._model.new_cache(1, len(self._prefix))
        ctx = self._model.context(1, len(self._prefix), cache)
        self._model.run_layers(self._model.embed(torch.tensor([self._prefix])), ctx)
        return cache.keys, cache.values

    @torch.inference_mode()
    def _batch(self, sentences: list[tuple[int, ...]]) -> np.ndarray:
        tails = [list(s) + self._suffix for s in sentences]
        lengths = torch.tensor([len(t) for t in tails])
        width, num_prefix = int(lengths.max()), len(self._prefix)
        ids = torch.tensor([t + [self._pad] * (width - len(t)) for t in tails])  # (B, T), right-padded
        model = self._model
        cache = model.new_cache(len(tails), num_prefix + width)
        cache.keys[:, :, :, :num_prefix] = self._prefix_kv[0]  # broadcast over the batch
        cache.values[:, :, :, :num_prefix] = self._prefix_kv[1]
        cache.advance(num_prefix)
        ctx = model.context(len(tails), width, cache)
        hidden = model.run_layers(model.embed(ids), ctx)  # (B, T, hidden)
        last = hidden[torch.arange(len(tails)), lengths - 1]  # (B, hidden): each row's last real token
        logits = model.head(last[:, None])[:, 0]  # (B, V)
        return (logits[:, self._positive] - logits[:, self._negative]).numpy()

    def calibrate(self, sentences: Sequence[Sequence[int]]) -> None:
        self.threshold = float(np.median(self.scores(sentences)))

    def accuracy(self, scores: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean((scores > self.threshold).astype(int) == labels))


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Logistic regression trained on (sanitized) train features, accuracy on (sanitized) test features."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=2000, C=1.0)
    classifier.fit(train_x, train_y)
    return float(classifier.score(test_x, test_y))
