"""Gather-per-row against grouped-by-adapter batched LoRA, measured side by side on this machine.

`python -m veil.lora.bench [--json]` times whole forwards through a few decoder layers of the bundled
model's shape (SmolLM2-135M: hidden 576, intermediate 1536; random weights, nothing downloaded) for
decode batches (T = 1) and prefill batches, with several numbers of distinct adapters per batch:
  base      the base model alone (no LoRA);
  grouped   `veil.lora.lora_projection`, the implementation veil uses;
  gathered  the alternative kept here only for this comparison: each row's A and B gathered from
            the slot table (`table[row_slots]`) and applied with one `bmm` per matrix.
Cases alternate within each repeat so the machine's load falls on all of them alike; figures are
medians. Both variants are checked to agree (1e-4) before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from veil.cc.device import Device
from veil.lora.adapter import random_adapter
from veil.lora.bank import DeviceAdapterBank
from veil.lora.layout import GroupSpan
from veil.lora.projection import LoraBatch, lora_projection
from veil.model.config import ModelConfig
from veil.model.llama import LayerWeights, Llama, Projection, decoder_layer
from veil.transport import TransportKind, make_transport

SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    rope_scaling=None,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_ids=(0,),
)


@dataclass(frozen=True)
class Case:
    """One batch shape: `rows` rows of `tokens` tokens, round-robin over `adapters` adapters."""

    rows: int
    tokens: int
    adapters: int
    base_rows: int = 0  # rows with no adapter, at the end of the batch


@dataclass(frozen=True)
class Figures:
    case: Case
    base_ms: float
    grouped_ms: float
    gathered_ms: float

    @property
    def gathered_over_grouped(self) -> float:
        return self.gathered_ms / self.grouped_ms


DEFAULT_CASES = (
    Case(rows=16, tokens=1, adapters=1),
    Case(rows=16, tokens=1, adapters=4),
    Case(rows=16, tokens=1, adapters=8),
    Case(rows=16, tokens=1, adapters=16),
    Case(rows=16, tokens=1, adapters=4, base_rows=8),
    Case(rows=4, tokens=64, adapters=1),
    Case(rows=4, tokens=64, adapters=4),
)


def add_lora_gathered(out: torch.Tensor, h: torch.Tensor, batch: LoraBatch, group: GroupSpan) -> None:
    """The per-row gather variant of `veil.lora.projection.add_lora` (same contract)."""
    rows = torch.tensor([i for i, s in enumerate(batch.row_slots) if s is not None])
    if rows.numel() == 0:
        return
    slots = torch.tensor([s for s in batch.row_slots if s is not None])
    rank, stacked = batch.layout.rank, len(group.targets) * batch.layout.rank
    table = batch.table  # (S, numel)
    a = table[:, group.a_offset : group.a_offset + stacked * group.in_features]
    a = a.reshape(-1, stacked, group.in_features)[slots]  # (m, n*r, in) gathered per row
    x = h.index_select(0, rows) if rows.numel() < h.shape[0] else h  # (m, T, in)
    u = torch.bmm(x, a.transpose(1, 2))  # (m, T, n*r)
    for j, span in enumerate(group.targets):
        width = span.out_end - span.out_start
        b = table[:, span.b_offset : span.b_offset + width * rank].reshape(-1, width, rank)[
            slots
        ]  # (m, out, r)
        delta = torch.bmm(u[..., j * rank : (j + 1) * rank], b.transpose(1, 2))  # (m, T, out_t)
        out[..., span.out_start : span.out_end].index_add_(0, rows, delta)


def _gathered_projection(weights: LayerWeights, layer: int, batch: LoraBatch) -> Projection:
    def project(h: torch.Tensor, name: str) -> torch.Tensor:
        out = F.linear(h, getattr(weights, name))
        group = batch.layout.group(layer, name)
        if group is not None:
            add_lora_gathered(out, h, batch, group)
        return out

    return project


Factory = Callable[[LayerWeights, int, LoraBatch], Projection]


def _forward(model: Llama, hidden: torch.Tensor, batch: LoraBatch | None, factory: Factory) -> torch.Tensor:
    ctx = model.context(hidden.shape[0], hidden.shape[1], None)
    for index, layer in enumerate(model.layers):
        weights = layer.weights()
        project = None if batch is None else factory(weights, index, batch)
        hidden = decoder_layer(hidden, weights, ctx, index, model.config, project=project)
    return hidden


def compare(
    cases: tuple[Case, ...] = DEFAULT_CASES,
    *,
    config: ModelConfig | None = None,
    rank: int = 16,
    repeats: int = 15,
) -> list[Figures]:
    """Median ms of one forward through every layer for base, grouped and gathered, per case.

    Args:
        config: the model shape; by default SmolLM2-135M's with 4 layers.

    Raises:
        AssertionError: if the two variants disagree by more than 1e-4.
    """
    config = config or ModelConfig(num_layers=4, **SMOLLM2_SHAPE)
    model = Llama(config)
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.data.normal_(0, 0.02, generator=generator)
    slots = max(c.adapters for c in cases)
    with (
        Device(capacity_bytes=1 << 30) as device,
        make_transport(TransportKind.PLAIN, device) as transport,
        DeviceAdapterBank(transport, config, num_slots=slots, rank=rank) as bank,
        torch.inference_mode(),
    ):
        for i in range(slots):
            bank.add(f"a{i}", random_adapter(config, rank=rank, alpha=2 * rank, seed=i))
            bank.load(f"a{i}", i)
        return [_measure(model, bank, case, repeats) for case in cases]


def _measure(model: Llama, bank: DeviceAdapterBank, case: Case, repeats: int) -> Figures:
    lora_rows = case.rows - case.base_rows
    batch = bank.batch([i % case.adapters for i in range(lora_rows)] + [None] * case.base_rows)
    hidden = torch.randn(
        case.rows, case.tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1)
    )
    runs = {
        "base": lambda: _forward(model, hidden, None, lora_projection),
        "grouped": lambda: _forward(model, hidden, batch, lora_projection),
        "gathered": lambda: _forward(model, hidden, batch, _gathered_projection),
    }
    if (runs["grouped"]() - runs["gathered"]()).abs().max().item() > 1e-4:
        raise AssertionError("grouped and gathered LoRA disagree")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    base, grouped, gathered = (statistics.median(times[n]) for n in runs)
    return Figures(case, base, grouped, gathered)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (every target, every layer)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    figures = compare(rank=args.rank, repeats=args.repeats)
    if args.json:
        print(json.dumps([asdict(f) | {"gathered_over_grouped": f.gathered_over_grouped} for f in figures]))
        return
    print("rows x tokens  adapters  base rows |  base ms  grouped ms  gathered ms  gathered/grouped")
    for f in figures:
        c = f.case
        print(
            f"{c.rows:>4} x {c.tokens:<6}  {c.adapters:>8}  {c.base_rows:>9} | {f.base_ms:>8.2f}  "
            f"{f.grouped_ms:>10.2f}  {f.gathered_ms:>11.2f}  {f.gathered_over_grouped:>16.2f}"
        )


if __name__ == "__main__":
    main()
