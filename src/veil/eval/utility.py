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
    """Scores token sequences with the difference of the " positive" and " negative" logits."""

    def __init__(self, loaded: Any, *, batch_size: int = 32) -> None:
        tokenizer = loaded.tokenizer
        self._model = loaded.model
        self._prefix = tokenizer.encode(PROMPT_PREFIX, add_special_tokens=False)
        self._suffix = tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False)
        self._positive = tokenizer.encode(" positive", add_special_tokens=False)[0]
        self._negative = tokenizer.encode(" negative", add_special_tokens=False)[0]
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._batch_size = batch_size
        self.threshold = 0.0

    def scores(self, sentences: Sequence[Sequence[int]], progress: Progress | None = None) -> np.ndarray:
        """logit(" positive") - logit(" negative") after each sentence's prompt."""
        prompts = [self._prefix + list(s) + self._suffix for s in sentences]
        order = np.argsort([len(p) for p in prompts])  # batch similar lengths together
        out = np.empty(len(prompts))
        for start in range(0, len(prompts), self._batch_size):
            chosen = order[start : start + self._batch_size]
            out[chosen] = self._batch([prompts[i] for i in chosen])
            if progress is not None:
                progress(min(start + self._batch_size, len(prompts)), len(prompts))
        return out

    @torch.inference_mode()
    def _batch(self, prompts: list[list[int]]) -> np.ndarray:
        width = max(len(p) for p in prompts)
        pad = torch.tensor([width - len(p) for p in prompts])
        ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts])  # (B, T), left-padded
        model = self._model
        ctx = model.context(len(prompts), width, None, pad)
        hidden = model.run_layers(model.embed(ids), ctx)
        logits = model.head(hidden[:, -1:])[:, 0]  # (B, V)
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
