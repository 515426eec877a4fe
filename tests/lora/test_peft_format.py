"""PEFT directories: a round trip, and a clear `AdapterError` for each way a directory can be wrong."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from veil.lora import Adapter, AdapterError, load_peft, random_adapter, save_peft
from veil.lora.peft_format import CONFIG_FILE, WEIGHTS_FILE

from .support import tiny_pair

_, MODEL = tiny_pair()
CONFIG = MODEL.config
KEY = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"


def _valid(path: Path) -> None:
    adapter = random_adapter(CONFIG, rank=4, alpha=8, targets=("q_proj", "v_proj"), layers=[0, 2], seed=1)
    save_peft(adapter, path)


def test_round_trip(tmp_path: Path) -> None:
    adapter = random_adapter(CONFIG, rank=4, alpha=8, targets=("k_proj", "up_proj"), layers=[1], seed=2)
    save_peft(adapter, tmp_path)
    loaded = load_peft(tmp_path, CONFIG)
    assert (loaded.rank, loaded.alpha, loaded.targets, loaded.layers) == (4, 8.0, ("k_proj", "up_proj"), (1,))
    for key, (a, b) in adapter.weights.items():
        assert torch.equal(loaded.weights[key][0], a) and torch.equal(loaded.weights[key][1], b)


def _config(**changes: object) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        raw = json.loads((path / CONFIG_FILE).read_text())
        (path / CONFIG_FILE).write_text(json.dumps(raw | changes))

    return mutate


def _tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        tensors = load_file(path / WEIGHTS_FILE)
        change(tensors)
        save_file(tensors, str(path / WEIGHTS_FILE))

    return mutate


def _other_base_model(path: Path) -> None:
    config = type(CONFIG)(**{**CONFIG.__dict__, "hidden_size": 32, "head_dim": 8})
    save_peft(
        random_adapter(config, rank=4, alpha=8, targets=("q_proj", "v_proj"), layers=[0, 2], seed=1), path
    )


BAD: dict[str, tuple[Callable[[Path], None], str]] = {
    "no config": (
        lambda p: (p / CONFIG_FILE).unlink(),
        "not a PEFT adapter directory: no adapter_config.json",
    ),
    "no weights": (lambda p: (p / WEIGHTS_FILE).unlink(), "no adapter_model.safetensors"),
    "corrupt config": (lambda p: (p / CONFIG_FILE).write_text("{r: 4"), "unreadable adapter files"),
    "corrupt weights": (lambda p: (p / WEIGHTS_FILE).write_bytes(b"nonsense"), "unreadable adapter files"),
    "not lora": (_config(peft_type="IA3"), "peft_type 'IA3' is not supported"),
    "dora": (_config(use_dora=True), "use_dora=True is not supported"),
    "bias": (_config(bias="all"), "bias='all' is not supported"),
    "rank pattern": (_config(rank_pattern={"q_proj": 2}), "rank_pattern"),
    "activated lora": (_config(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens"),
    "excluded modules": (_config(exclude_modules=["q_proj"]), "exclude_modules"),
    "rank zero": (_config(r=0), "rank r must be a positive integer"),
    "unknown target": (
        _config(target_modules=["q_proj", "lm_head"]),
        r"unknown target module\(s\) \['lm_head'\]",
    ),
    "missing target": (
        _config(target_modules=["q_proj", "v_proj", "k_proj"]),
        "missing target module weights",
    ),
    "regex matching nothing": (_config(target_modules=r".*\.wq"), "matches none of"),
    "layer out of range": (_config(layers_to_transform=[0, 5]), r"layers_to_transform \[5\] out of range"),
    "layer not named": (_config(layers_to_transform=[0]), "that the config does not name"),
    "rank mismatch": (_config(r=8), r"needs \(8, 64\) at rank 8"),
    "other base model": (_other_base_model, "trained for another base model"),
    "unexpected tensor": (
        _tensors(lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)})),
        "unexpected tensor",
    ),
    "missing B": (_tensors(lambda t: t.pop(KEY.format(2, "v_proj", "B"))), "layer 2 v_proj has no lora_B"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_directories_are_refused_clearly(tmp_path: Path, case: str) -> None:
    _valid(tmp_path)
    load_peft(tmp_path, CONFIG)  # valid before the mutation
    mutate, message = BAD[case]
    mutate(tmp_path)
    with pytest.raises(AdapterError, match=message):
        load_peft(tmp_path, CONFIG)


def test_training_only_and_null_fields_are_accepted(tmp_path: Path) -> None:
    _valid(tmp_path)
    _config(
        init_lora_weights="gaussian", lora_dropout=0.1, rank_pattern=None, loftq_config={}, use_dora=None
    )(tmp_path)
    assert load_peft(tmp_path, CONFIG).rank == 4


def test_regex_and_all_linear_targets(tmp_path: Path) -> None:
    _valid(tmp_path)
    _config(target_modules=r".*\.(q|v)_proj")(tmp_path)
    assert load_peft(tmp_path, CONFIG).targets == ("q_proj", "v_proj")
    save_peft(random_adapter(CONFIG, rank=2, alpha=2, seed=3), tmp_path)
    _config(target_modules="all-linear", layers_to_transform=None)(tmp_path)
    assert len(load_peft(tmp_path, CONFIG).targets) == 7


def test_save_refuses_what_peft_cannot_express(tmp_path: Path) -> None:
    weights = dict(random_adapter(CONFIG, rank=2, alpha=2, targets=("q_proj", "v_proj"), seed=0).weights)
    del weights[(1, "v_proj")]
    ragged = Adapter(rank=2, alpha=2, weights=weights)
    with pytest.raises(ValueError, match="same targets on every adapted layer"):
        save_peft(ragged, tmp_path)
