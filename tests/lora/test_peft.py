"""veil's LoRA against PEFT's own implementation on the same base weights and adapters, both directions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from veil.lora import Adapter, load_peft, random_adapter, save_peft

from .support import bank_on, lora_forward, tiny_pair

peft = pytest.importorskip("peft", reason="peft is a dev dependency (pip install -e '.[dev]')")

TOL = 1e-4  # float32 logits; PEFT computes base + scaling * B(A(x)) per module, veil fuses q/k/v
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))


def _veil_logits(path: Path) -> torch.Tensor:
    _, model = tiny_pair()
    adapter = load_peft(path, model.config)
    with bank_on(model.config, rank=max(adapter.rank, 8)) as bank, torch.inference_mode():
        bank.add("x", adapter)
        bank.load("x", 0)
        return lora_forward(model, IDS, bank.batch([0] * len(IDS)))


def _peft_logits(path: Path) -> torch.Tensor:
    hf, _ = tiny_pair()
    with torch.inference_mode():
        return peft.PeftModel.from_pretrained(hf, str(path)).eval()(IDS).logits


@pytest.mark.parametrize("use_rslora", [False, True])
def test_veil_saved_adapter_matches_peft(tmp_path: Path, use_rslora: bool) -> None:
    _, model = tiny_pair()
    adapter = random_adapter(
        model.config, rank=4, alpha=12, targets=("q_proj", "v_proj", "down_proj"), seed=7
    )
    if use_rslora:
        adapter = Adapter(rank=4, alpha=12, weights=adapter.weights, use_rslora=True)
    save_peft(adapter, tmp_path)
    veil, ref = _veil_logits(tmp_path), _peft_logits(tmp_path)
    assert (veil - ref).abs().max().item() <= TOL
    with torch.inference_mode():
        assert (ref - model(IDS)).abs().max().item() > 100 * TOL  # PEFT did apply it


def test_peft_created_adapter_matches_veil(tmp_path: Path) -> None:
    hf, _ = tiny_pair()
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"],
        layers_to_transform=[0, 2],
        init_lora_weights=False,  # random B: an adapter that changes the outputs, as after training
    )
    torch.manual_seed(11)
    model = peft.get_peft_model(hf, config).eval()
    model.save_pretrained(str(tmp_path))
    with torch.inference_mode():
        ref = model(IDS).logits
        base = tiny_pair()[1](IDS)
    assert (_veil_logits(tmp_path) - ref).abs().max().item() <= TOL
    assert (ref - base).abs().max().item() > 100 * TOL  # the adapter does change the outputs
