"""A frozen sentence encoder (all-MiniLM-L6-v2 by default): texts to unit vectors, mean pooling.

The word space (`veil.privacy.words`) scores whole words with it, and the evaluation's probe uses it as
its feature extractor. Loaded offline from a local directory (config, tokenizer, safetensors); nothing is
downloaded here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class SentenceEncoder:
    """Mean-pooled last hidden states of a BERT-style encoder, rows scaled to unit length."""

    def __init__(self, directory: Path, *, batch_size: int = 256, max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = directory.name
        self._tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
        self._batch_size = batch_size
        self._max_length = max_length
        self.dim: int = int(self._model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit rows; texts of similar length are batched together."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self._batch_size):
            chosen = order[start : start + self._batch_size]
            batch = self._tokenizer(
                [texts[i] for i in chosen],
                padding=True,
                truncation=True,
                max_length=self._max_length,
                return_tensors="pt",
            )
            hidden = self._model(**batch).last_hidden_state  # (B, T, dim)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, dim)
            out[chosen] = torch.nn.functional.normalize(pooled, dim=1).numpy()
        return out
