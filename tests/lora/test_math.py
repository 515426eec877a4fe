"""LoRA outputs against the merged-weight model, against base rows, and rows of a mixed batch alone."""

from __future__ import annotations

import pytest
import torch

from veil.lora import TARGETS, Adapter, LoraBatch, random_adapter

from .support import bank_on, greedy, lora_forward, merged, tiny_pair

TOL = 1e-4  # float32 logits of magnitude ~1: LoRA applied unmerged vs merged differ only in rounding

_, MODEL = tiny_pair()
CONFIG = MODEL.config
IDS = torch.randint(0, CONFIG.vocab_size, (4, 11), generator=torch.Generator().manual_seed(3))

ADAPTERS: dict[str, Adapter] = {
    "all-targets": random_adapter(CONFIG, rank=8, alpha=16, seed=1),
    "q-v": random_adapter(CONFIG, rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=2),
    "mlp-layer-1": random_adapter(
        CONFIG, rank=8, alpha=4, targets=("gate_proj", "down_proj"), layers=[1], seed=3
    ),
    "rank-2-rslora": Adapter(
        rank=2, alpha=3, weights=random_adapter(CONFIG, rank=2, alpha=3, seed=4).weights, use_rslora=True
    ),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_equals_merged_weights(name: str) -> None:
    adapter = ADAPTERS[name]
    with bank_on(CONFIG) as bank, torch.inference_mode():
        bank.add(name, adapter)
        bank.load(name, 2)
        got = lora_forward(MODEL, IDS, bank.batch([2] * len(IDS)))
        want = merged(MODEL, adapter)(IDS)
        assert (got - want).abs().max().item() <= TOL
        assert (got - MODEL(IDS)).abs().max().item() > 100 * TOL  # the adapter does change the outputs


def test_bank_with_fewer_targets_applies_them() -> None:
    adapter = ADAPTERS["q-v"]
    with bank_on(CONFIG, targets=("q_proj", "v_proj")) as bank, torch.inference_mode():
        bank.add("qv", adapter)
        bank.load("qv", 0)
        got = lora_forward(MODEL, IDS, bank.batch([0] * len(IDS)))
        assert (got - merged(MODEL, adapter)(IDS)).abs().max().item() <= TOL


def test_mixed_batch_rows_equal_each_row_alone() -> None:
    rows = ["all-targets", None, "q-v", "all-targets"]
    slot_of = {"all-targets": 3, "q-v": 1, None: None}
    with bank_on(CONFIG) as bank, torch.inference_mode():
        for name in ("all-targets", "q-v"):
            bank.add(name, ADAPTERS[name])
            bank.load(name, slot_of[name])
        got = lora_forward(MODEL, IDS, bank.batch([slot_of[name] for name in rows]))
        base = MODEL(IDS)
        for i, name in enumerate(rows):
            alone = lora_forward(MODEL, IDS[i : i + 1], bank.batch([slot_of[name]]))[0]
            assert (got[i] - alone).abs().max().item() <= TOL
            if name is None:
                assert torch.equal(got[i], base[i])  # a base row is the base model's, bit for bit
            else:
                assert (got[i] - merged(MODEL, ADAPTERS[name])(IDS[i : i + 1])[0]).abs().max().item() <= TOL


def test_all_base_rows_equal_the_base_model_exactly() -> None:
    with bank_on(CONFIG) as bank, torch.inference_mode():
        assert torch.equal(lora_forward(MODEL, IDS, bank.batch([None] * len(IDS))), MODEL(IDS))


def test_targets_cover_every_linear_map() -> None:
    assert set(TARGETS) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_mixed_greedy_decoding_with_a_kv_cache_equals_each_merged_model_alone() -> None:
    """Prefill then one-token decode steps (the engine's shapes): each row's tokens are those of its
    adapter's merged model run alone; the base row's are the base model's."""
    rows = ["all-targets", None, "mlp-layer-1"]
    slot_of = {"all-targets": 0, "mlp-layer-1": 1, None: None}
    prompts = IDS[:3, :6]
    with bank_on(CONFIG) as bank, torch.inference_mode():
        for name in ("all-targets", "mlp-layer-1"):
            bank.add(name, ADAPTERS[name])
            bank.load(name, slot_of[name])
        got = greedy(MODEL, prompts, 12, bank.batch([slot_of[name] for name in rows]))
        for i, name in enumerate(rows):
            model = MODEL if name is None else merged(MODEL, ADAPTERS[name])
            assert got[i] == greedy(model, prompts[i : i + 1], 12)[0]
        assert got[0] != greedy(MODEL, prompts[:1], 12)[0]  # the adapter changes the greedy tokens


def test_rows_must_match_the_batch() -> None:
    with bank_on(CONFIG) as bank, torch.inference_mode():
        bank.add("a", ADAPTERS["q-v"])
        bank.load("a", 0)
        with pytest.raises(ValueError, match="input has 4 rows, the LoRA batch 2"):
            lora_forward(MODEL, IDS, bank.batch([0, None]))
        with pytest.raises(ValueError, match=r"slots \[7\] outside a table of 4 slots"):
            LoraBatch.of(bank.layout, bank.slot_tensor(0).view(1, -1).expand(4, -1), [7])
