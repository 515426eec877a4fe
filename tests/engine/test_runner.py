"""The model runner: paged attention equals the contiguous cache; swapped blocks come back bit-exact."""

from __future__ import annotations

import pytest
import torch

from veil.cc.device import Device
from veil.engine.block_manager import BlockManager, BlockMove
from veil.engine.request import Sequence
from veil.engine.runner import ModelRunner, kv_block_bytes, layer_cost, padding_bounded_groups
from veil.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from veil.engine.weights import ResidentWeights
from veil.lora.layout import SlotLayout
from veil.model.llama import Llama
from veil.model.sampling import SamplingParams
from veil.transport import make_transport
from veil.transport.base import TransportKind

from .support import random_llama, tiny_config

MiB = 2**20


def run_scheduled(model: Llama, prompts: list[list[int]], max_tokens: int, budget: int) -> dict[int, list]:
    """Greedy decode through scheduler + runner; every step's logits per sequence."""
    bm = BlockManager(num_device_blocks=32, num_host_blocks=0, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=budget), bm)
    seqs = [Sequence(i, p, SamplingParams(max_tokens=max_tokens), frozenset()) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    logits_of: dict[int, list] = {seq.seq_id: [] for seq in seqs}
    with Device(capacity_bytes=64 * MiB) as device, make_transport(TransportKind.PLAIN, device) as transport:
        with (
            ResidentWeights(model, transport) as weights,
            ModelRunner(
                model.config, weights, transport, num_device_blocks=32, num_host_blocks=0, block_size=4
            ) as runner,
        ):
            while scheduler.has_unfinished():
                out = scheduler.schedule()
                logits = runner.execute(out)
                for seq_id, row in logits.items():
                    logits_of[seq_id].append(row.clone())
                scheduler.postprocess(out, {s: int(row.argmax()) for s, row in logits.items()})
    for seq in seqs:
        logits_of[seq.seq_id] = [seq.prompt_token_ids + seq.output_token_ids, logits_of[seq.seq_id]]
    return logits_of


def test_paged_batches_of_mixed_lengths_match_the_contiguous_model(tiny: Llama) -> None:
    """Chunked prefill beside decodes, rows of different lengths: the same logits as one full forward."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 101, (n,), generator=gen).tolist() for n in (5, 13, 1, 9)]
    results = run_scheduled(tiny, prompts, max_tokens=6, budget=8)
    for tokens, step_logits in results.values():
        assert len(step_logits) == 6
        with torch.inference_mode():
            full = tiny(torch.tensor([tokens]))[0]  # (T, vocab)
        prompt_len = len(tokens) - 6
        expected = full[prompt_len - 1 : prompt_len + 5]
        assert torch.allclose(torch.stack(step_logits), expected, atol=1e-4)


SWAP_CONFIG = tiny_config(num_kv_heads=8, head_dim=128)  # a block of 16 tokens: 256 KiB (bulk for pipellm)


@pytest.mark.parametrize("kind", list(TransportKind))
def test_swapped_blocks_come_back_bit_exact(kind: TransportKind) -> None:
    model = random_llama(SWAP_CONFIG)
    block_bytes = kv_block_bytes(SWAP_CONFIG, 16)
    assert block_bytes == 256 * 1024
    with Device(capacity_bytes=64 * MiB) as device, make_transport(kind, device) as transport:
        with (
            ResidentWeights(model, transport) as weights,
            ModelRunner(
                SWAP_CONFIG, weights, transport, num_device_blocks=6, num_host_blocks=4, block_size=16
            ) as runner,
        ):
            kv = runner.kv.tensor
            for round_ in range(3):  # host blocks are reused across rounds
                kv.copy_(torch.randn(kv.shape, generator=torch.Generator().manual_seed(round_)))
                before = kv.clone()
                runner.swap([BlockMove(1, 0), BlockMove(3, 1), BlockMove(4, 2)], [])
                kv.fill_(float("nan"))  # the device reuses the blocks meanwhile
                runner.hint_swap_in([2, 0])
                runner.swap([], [BlockMove(2, 0), BlockMove(0, 5), BlockMove(1, 2)])
                for src, dst in ((4, 0), (1, 5), (3, 2)):
                    assert torch.equal(kv[dst].view(torch.uint8), before[src].view(torch.uint8))
            allocated = device.allocated_bytes
        assert device.allocated_bytes == allocated - 6 * block_bytes - ResidentWeights.device_bytes(model)
        assert device.allocated_bytes == 0


def test_the_kv_cache_lives_in_the_device_arena(tiny: Llama) -> None:
    block_bytes = kv_block_bytes(tiny.config, 4)
    weights_bytes = ResidentWeights.device_bytes(tiny)
    with Device(capacity_bytes=weights_bytes + 3 * block_bytes) as device:
        with make_transport(TransportKind.PLAIN, device) as transport, ResidentWeights(tiny, transport) as w:
            ModelRunner(
                tiny.config, w, transport, num_device_blocks=3, num_host_blocks=0, block_size=4
            ).close()
            with pytest.raises(Exception, match="cannot allocate"):
                ModelRunner(tiny.config, w, transport, num_device_blocks=4, num_host_blocks=0, block_size=4)


def test_prefill_batches_bound_their_padding() -> None:
    def chunk(n: int) -> ScheduledChunk:
        return ScheduledChunk(seq_id=n, token_ids=(1,) * n, start=0, block_table=(0,), sample=True)

    groups = padding_bounded_groups([chunk(n) for n in (10, 100, 95, 9, 50, 98)])
    assert [[len(c.token_ids) for c in g] for g in groups] == [[100, 98, 95], [50], [10, 9]]
    for group in groups:
        real = sum(len(c.token_ids) for c in group)
        assert len(group[0].token_ids) * len(group) <= 1.1 * real


def test_layer_cost_counts_the_adapter_matmuls_of_rows_with_an_adapter() -> None:
    config = tiny_config()  # hidden 64, q 64, intermediate 96
    layout = SlotLayout(config, rank=4, targets=("q_proj", "down_proj"))
    chunks = [
        ScheduledChunk(0, (1, 2, 3), 0, (0,), True, adapter_slot=0),  # 3 tokens with an adapter
        ScheduledChunk(1, (4,), 5, (1, 2), True, adapter_slot=None),  # 1 without: no extra cost
    ]
    base_flops, base_bytes = layer_cost(config, chunks)
    flops, nbytes = layer_cost(config, chunks, layout)
    # per adapted token, 2 x rank x (in + out) per target: q_proj 64 + 64, down_proj 96 + 64
    assert flops - base_flops == 2 * 4 * 3 * ((64 + 64) + (96 + 64))
    assert nbytes == base_bytes
