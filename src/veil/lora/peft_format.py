"""PEFT's adapter directory format: `adapter_config.json` + `adapter_model.safetensors`.

The one place where PEFT's key names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`)
and its config fields are read and written. What veil cannot apply is refused with `AdapterError`
rather than silently dropped: DoRA, biases, fan-in-fan-out storage, per-module rank/alpha patterns,
`modules_to_save`, and targets other than the seven linear maps of a Llama layer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from veil.lora.adapter import Adapter, AdapterError
from veil.lora.layout import PARENT_OF, TARGETS
from veil.model.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
# Fields whose set value changes what inference computes in a way veil does not implement (or
# might: a variant veil does not know is refused rather than applied as plain LoRA). Fields that
# only shape training (init, dropout, eva/corda/loftq configs) are ignored.
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "exclude_modules": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_qalora": False,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
}


def module_key(layer: int, target: str) -> str:
    """PEFT's module path of `target` in `layer` (without the `base_model.model.` prefix)."""
    return f"model.layers.{layer}.{PARENT_OF[target]}.{target}"


def load_peft(path: str | Path, config: ModelConfig) -> Adapter:
    """Read and validate a PEFT LoRA directory for a base model of shape `config`.

    Raises:
        AdapterError: if a file is missing, the config asks for something veil does not support, a
            target is unknown or its weights are missing, a layer is out of range, or a matrix does not
            fit the base model.
    """
    root = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            raise AdapterError(f"{root} is not a PEFT adapter directory: no {name}")
    try:
        raw = json.loads((root / CONFIG_FILE).read_text())
        tensors = load_file(root / WEIGHTS_FILE)
    except (ValueError, OSError, SafetensorError) as error:  # JSONDecodeError is a ValueError
        raise AdapterError(f"{root}: unreadable adapter files: {error}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{root}: {CONFIG_FILE} must hold a JSON object")
    _check_config(raw, root)
    rank = raw.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{root}: rank r must be a positive integer, got {rank!r}")
    layers = _layers(raw.get("layers_to_transform"), config, root)
    expected = _modules(raw.get("target_modules"), layers, root)
    weights = _weights(tensors, expected, root)
    adapter = Adapter(
        rank=rank,
        alpha=float(raw.get("lora_alpha", 8)),
        weights=weights,
        use_rslora=bool(raw.get("use_rslora", False)),
    )
    try:
        adapter.check(config)
    except AdapterError as error:
        raise AdapterError(f"{root}: {error}") from None
    return adapter


def save_peft(adapter: Adapter, path: str | Path, *, base_model: str | None = None) -> None:
    """Write `adapter` as a PEFT LoRA directory (created if needed) that `peft` itself can load.

    Raises:
        ValueError: if the adapter does not adapt the same targets on each of its layers (PEFT's
            `target_modules` x `layers_to_transform` cannot say otherwise).
    """
    if set(adapter.weights) != {(layer, t) for layer in adapter.layers for t in adapter.targets}:
        raise ValueError("PEFT's format needs the same targets on every adapted layer")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "target_modules": list(adapter.targets),
        "layers_to_transform": list(adapter.layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    tensors = {}
    for (layer, target), (a, b) in adapter.weights.items():
        key = _PREFIX + module_key(layer, target)
        tensors[f"{key}.lora_A.weight"] = a.contiguous()
        tensors[f"{key}.lora_B.weight"] = b.contiguous()
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(root / WEIGHTS_FILE), metadata={"format": "pt"})


def _check_config(raw: dict[str, Any], root: Path) -> None:
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{root}: peft_type {raw.get('peft_type')!r} is not supported; only LORA")
    for field, default in _UNSUPPORTED.items():
        value = raw.get(field, default)
        if value != default and value:  # absent, null and empty all mean the default
            raise AdapterError(f"{root}: {field}={value!r} is not supported (must be {default!r})")


def _layers(value: Any, config: ModelConfig, root: Path) -> tuple[int, ...]:
    if value is None:
        return tuple(range(config.num_layers))
    layers = (value,) if isinstance(value, int) else tuple(value)
    bad = [layer for layer in layers if not isinstance(layer, int) or not 0 <= layer < config.num_layers]
    if bad:
        raise AdapterError(
            f"{root}: layers_to_transform {bad} out of range: the base model has {config.num_layers} layers"
        )
    return layers


def _modules(value: Any, layers: tuple[int, ...], root: Path) -> set[tuple[int, str]]:
    """The adapted (layer, target) pairs that `target_modules` names: a list of names (PEFT matches
    their last component), "all-linear", or a regular expression PEFT matches against a module's path."""
    if isinstance(value, str) and value != "all-linear":
        pattern = re.compile(value)
        found = {(i, t) for i in layers for t in TARGETS if pattern.fullmatch(module_key(i, t))}
        if not found:
            raise AdapterError(f"{root}: target_modules {value!r} matches none of {', '.join(TARGETS)}")
        return found
    if value == "all-linear":
        value = list(TARGETS)
    if not isinstance(value, list | tuple) or not value:
        raise AdapterError(f"{root}: target_modules must be a non-empty list, got {value!r}")
    names = [str(name).rsplit(".", 1)[-1] for name in value]
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        raise AdapterError(f"{root}: unknown target module(s) {unknown}; supported: {', '.join(TARGETS)}")
    return {(layer, target) for layer in layers for target in names}


def _weights(
    tensors: dict[str, torch.Tensor], expected: set[tuple[int, str]], root: Path
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key.removeprefix(_PREFIX))
        if match is None or match[3] not in TARGETS or PARENT_OF[match[3]] != match[2]:
            raise AdapterError(f"{root}: unexpected tensor {key!r} (veil applies only LoRA A/B of {TARGETS})")
        found.setdefault((int(match[1]), match[3]), {})[match[4]] = tensor.to(torch.float32)
    extra = sorted(set(found) - expected)
    if extra:
        raise AdapterError(f"{root}: weights for (layer, target) {extra} that the config does not name")
    weights = {}
    for layer, target in sorted(expected):
        pair = found.get((layer, target), {})
        if set(pair) != {"A", "B"}:
            raise AdapterError(
                f"{root}: missing target module weights: layer {layer} {target} has no "
                f"lora_{'A' if 'A' not in pair else 'B'}.weight"
            )
        weights[(layer, target)] = (pair["A"], pair["B"])
    return weights
