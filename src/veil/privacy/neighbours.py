"""Candidate sets for the noisy-max sanitizer: per-token top-K neighbours or disjoint groups.

Similarity is the cosine of embedding rows. Tables are computed in row blocks (a block of rows against
all eligible tokens at a time), so the full V x V similarity matrix is never held, and cached on disk under
`$VEIL_CACHE/cmif` (default `~/.cache/veil/cmif`) keyed by a hash of the embedding matrix, the eligible
mask and the parameters. Only eligible tokens ever appear in a candidate set; an ineligible token (special,
byte-level) is *anchored* to its most similar eligible token and uses that token's set.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TABLE_FORMAT = 3
ProgressFn = Callable[[str, int, int], None]


class Metric(enum.Enum):
    """How neighbours are ranked: cosine similarity (veil) or Euclidean distance (CusText)."""

    COSINE = "cosine"
    EUCLIDEAN = "euclidean"


class CandidateSet(enum.Enum):
    """How a token's output set is chosen (see docs/privacy.md for the guarantee of each)."""

    TOP_K = "top-k"  # each token's own K most similar eligible tokens: no DP bound between two tokens
    GROUPS = "groups"  # disjoint groups of K..2K-1 similar tokens sharing one output set: eps-DP in a group


@dataclass(frozen=True)
class CandidateTable:
    """`anchor[v]`: the eligible token whose set v uses (v itself when eligible).

    `sets[i]`: candidate token ids of set i, padded with -1; `set_of[v]`: the set token v draws from. For
    TOP_K there is one set per token (`set_of[v] == v`); for GROUPS one per group.
    """

    kind: CandidateSet
    anchor: np.ndarray  # (V,) int64
    set_of: np.ndarray  # (V,) int64
    sets: np.ndarray  # (num_sets, max_set_size) int64, -1 padded

    def candidates(self, token_ids: np.ndarray) -> np.ndarray:
        """The (n, max_set_size) candidate ids, -1 padded, of each token in `token_ids`."""
        return self.sets[self.set_of[token_ids]]


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so dot products are cosine similarities."""
    e = np.asarray(embeddings, dtype=np.float32)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _prepare(embeddings: np.ndarray, metric: Metric) -> np.ndarray:
    return unit_rows(embeddings) if metric is Metric.COSINE else np.asarray(embeddings, dtype=np.float32)


def _closeness(rows: np.ndarray, candidates: np.ndarray, metric: Metric) -> np.ndarray:
    """(n, m) scores ranking candidates by closeness: cosine, or -||x-y||^2 + ||x||^2 for Euclidean."""
    dots = rows @ candidates.T
    if metric is Metric.COSINE:
        return dots
    return 2 * dots - (candidates * candidates).sum(axis=1)[None, :]


def top_k_neighbours(
    vectors: np.ndarray,
    eligible: np.ndarray,
    *,
    k: int,
    metric: Metric = Metric.COSINE,
    block_rows: int = 512,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """The (V, k) ids of each row's k closest *eligible* rows, best first (itself included).

    `vectors` are unit rows for COSINE, raw embeddings for EUCLIDEAN."""
    import torch  # imported here so that `veil.cmif` stays light for modules that never build tables

    eligible_ids = np.flatnonzero(eligible)
    if k > eligible_ids.size:
        raise ValueError(f"k={k} exceeds the {eligible_ids.size} eligible tokens")
    candidates = torch.from_numpy(vectors[eligible_ids])  # (n_eligible, d)
    rows = torch.from_numpy(vectors)
    num_rows = vectors.shape[0]
    out = np.empty((num_rows, k), dtype=np.int64)
    for start in range(0, num_rows, block_rows):
        scores = _closeness(rows[start : start + block_rows], candidates, metric)  # (block, n_eligible)
        out[start : start + block_rows] = eligible_ids[scores.topk(k, dim=1).indices.numpy()]
        if progress is not None:
            progress("neighbours", min(start + block_rows, num_rows), num_rows)
    return out


def build_top_k(
    vectors: np.ndarray,
    eligible: np.ndarray,
    *,
    k: int,
    metric: Metric = Metric.COSINE,
    progress: ProgressFn | None = None,
) -> CandidateTable:
    sets = top_k_neighbours(vectors, eligible, k=k, metric=metric, progress=progress)
    ids = np.arange(vectors.shape[0])
    return CandidateTable(CandidateSet.TOP_K, anchor=sets[:, 0].copy(), set_of=ids, sets=sets)


def build_groups(
    vectors: np.ndarray,
    eligible: np.ndarray,
    *,
    k: int,
    metric: Metric = Metric.COSINE,
    seed_order: np.ndarray | None = None,
    progress: ProgressFn | None = None,
    block_seeds: int = 256,
) -> CandidateTable:
    """Greedy disjoint groups: each unassigned seed takes its k-1 closest unassigned eligible tokens.

    Seeds come in `seed_order` (CusText: corpus frequency), by default in token id order, which for BPE
    vocabularies is merge order and puts frequent tokens first (a "densest first" order was tried and gave
    common words worse groups). When fewer than 2k tokens remain they all join the last group: sizes lie
    in [k, 2k-1].

    Seeds are scored in blocks of `block_seeds` against the tokens still unassigned (one matrix product
    per block, never the V x V matrix); a seed whose shortlist ran dry inside its block is rescored alone.
    """
    import torch

    eligible_ids = np.flatnonzero(eligible)
    if eligible_ids.size < k:
        raise ValueError(f"k={k} exceeds the {eligible_ids.size} eligible tokens")
    order = eligible_ids if seed_order is None else _complete_order(seed_order, eligible)
    rows = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    assigned = ~eligible.copy()
    groups: list[np.ndarray] = []
    remaining = eligible_ids.size
    position = 0
    while remaining >= 2 * k:
        pool = np.flatnonzero(~assigned)
        seeds = []
        while len(seeds) < block_seeds and position < order.size:
            if not assigned[order[position]]:
                seeds.append(int(order[position]))
            position += 1
        width = min(4 * k, pool.size)
        shortlist = pool[_closeness(rows[seeds], rows[pool], metric).topk(width, dim=1).indices.numpy()]
        for seed, near in zip(seeds, shortlist):
            if assigned[seed] or remaining < 2 * k:
                continue
            members = near[~assigned[near]][:k]
            if seed not in members:
                members = np.concatenate([[seed], members[members != seed]])[:k]
            if members.size < k:
                members = _nearest_unassigned(rows, seed, np.flatnonzero(~assigned), k, metric)
            assigned[members] = True
            remaining -= members.size
            groups.append(members)
        if progress is not None:
            progress("groups", eligible_ids.size - remaining, eligible_ids.size)
    if remaining:
        groups.append(np.flatnonzero(~assigned))
    if progress is not None:
        progress("groups", eligible_ids.size, eligible_ids.size)
    return _group_table(_anchors(rows, eligible, metric), groups, vectors.shape[0])


def _complete_order(seed_order: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """`seed_order`'s eligible tokens first, then every other eligible token by id."""
    first = np.asarray([t for t in dict.fromkeys(int(t) for t in seed_order) if eligible[t]], dtype=np.int64)
    rest = np.setdiff1d(np.flatnonzero(eligible), first, assume_unique=False)
    return np.concatenate([first, rest])


def _nearest_unassigned(rows: Any, seed: int, pool: np.ndarray, k: int, metric: Metric) -> np.ndarray:
    """The seed and its k-1 closest tokens of `pool` (a fallback when a block's shortlist ran dry)."""
    sims = _closeness(rows[[seed]], rows[pool], metric)[0].numpy()
    sims[pool == seed] = np.inf  # the seed always belongs to its own group
    return pool[np.argpartition(-sims, k - 1)[:k]]


def _anchors(rows: Any, eligible: np.ndarray, metric: Metric, block_rows: int = 512) -> np.ndarray:
    """Each token's set anchor: itself when eligible, else its closest eligible token."""
    anchor = np.arange(eligible.size, dtype=np.int64)
    eligible_ids = np.flatnonzero(eligible)
    others = np.flatnonzero(~eligible)
    for start in range(0, others.size, block_rows):
        block = others[start : start + block_rows]
        scores = _closeness(rows[block], rows[eligible_ids], metric)
        anchor[block] = eligible_ids[scores.argmax(dim=1).numpy()]
    return anchor


def _group_table(anchor: np.ndarray, groups: list[np.ndarray], num_tokens: int) -> CandidateTable:
    width = max(g.size for g in groups)
    sets = np.full((len(groups), width), -1, dtype=np.int64)
    group_of = np.full(num_tokens, -1, dtype=np.int64)
    for i, members in enumerate(groups):
        sets[i, : members.size] = members
        group_of[members] = i
    set_of = group_of[anchor]
    assert (set_of >= 0).all()
    return CandidateTable(CandidateSet.GROUPS, anchor=anchor.astype(np.int64), set_of=set_of, sets=sets)


def cache_dir() -> Path:
    return Path(os.environ.get("VEIL_CACHE", Path.home() / ".cache" / "veil")) / "cmif"


def table_key(
    embeddings: np.ndarray,
    eligible: np.ndarray,
    *,
    kind: CandidateSet,
    k: int,
    metric: Metric,
    seed_order: np.ndarray | None,
) -> str:
    h = hashlib.sha256(f"v{TABLE_FORMAT}/{kind.value}/{k}/{metric.value}/{embeddings.shape}".encode())
    for part in (np.asarray(embeddings, dtype=np.float32), eligible, seed_order):
        if part is not None:
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()[:32]


def load_or_build(
    embeddings: np.ndarray,
    eligible: np.ndarray,
    *,
    kind: CandidateSet,
    k: int,
    metric: Metric = Metric.COSINE,
    seed_order: np.ndarray | None = None,
    directory: Path | None = None,
    progress: ProgressFn | None = None,
) -> CandidateTable:
    """The cached table for these embeddings and parameters, built (and cached) on a miss."""
    key = table_key(embeddings, eligible, kind=kind, k=k, metric=metric, seed_order=seed_order)
    path = (directory or cache_dir()) / f"{kind.value}-k{k}-{key}.npz"
    if path.exists():
        with np.load(path) as data:
            return CandidateTable(kind, anchor=data["anchor"], set_of=data["set_of"], sets=data["sets"])
    vectors = _prepare(embeddings, metric)
    if kind is CandidateSet.TOP_K:
        table = build_top_k(vectors, eligible, k=k, metric=metric, progress=progress)
    else:
        table = build_groups(vectors, eligible, k=k, metric=metric, seed_order=seed_order, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, anchor=table.anchor, set_of=table.set_of, sets=table.sets)
    os.replace(tmp, path)
    return table


def tqdm_progress() -> ProgressFn:
    """A progress callback drawing one tqdm bar per stage on stderr."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def report(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None or bar.total != total:
            bar = bars[stage] = tqdm(total=total, desc=f"[cmif] {stage}", unit=" rows", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


def balance_groups(
    vectors: np.ndarray, table: CandidateTable, *, iterations: int = 4, choices: int = 8
) -> CandidateTable:
    """Tighter disjoint groups of the same sizes: a few rounds of capacity-constrained k-means (cosine).

    Each round takes each group's mean direction, then assigns (token, group) pairs in decreasing
    similarity, each token to the first of its `choices` closest groups that still has room (a group
    keeps its size); a token whose choices are all full goes to the closest group with room. The table's
    members stay the same tokens and every group keeps its size, so the GROUPS guarantee is unchanged.
    `vectors` are unit rows."""
    import torch

    sets = table.sets.copy()
    sizes = (sets >= 0).sum(axis=1)
    members = sets[sets >= 0]
    rows = torch.from_numpy(np.ascontiguousarray(vectors[members], dtype=np.float32))  # (n, d)
    group = np.repeat(np.arange(len(sets)), sizes)  # current group of each member
    for _ in range(iterations):
        centroids = torch.zeros(len(sets), rows.shape[1]).index_add_(0, torch.from_numpy(group), rows)
        centroids = torch.nn.functional.normalize(centroids, dim=1)
        sims = rows @ centroids.T  # (n, num_groups)
        top = sims.topk(min(choices, len(sets)), dim=1)
        group = _assign_with_capacity(top.values.numpy(), top.indices.numpy(), sims.numpy(), sizes)
    out = np.full_like(sets, -1)
    for g in range(len(sets)):
        chosen = members[group == g]
        out[g, : chosen.size] = chosen
    group_of = np.full(table.set_of.shape[0], -1, dtype=np.int64)
    group_of[members] = group
    return CandidateTable(table.kind, anchor=table.anchor, set_of=group_of[table.anchor], sets=out)


def _assign_with_capacity(
    values: np.ndarray, indices: np.ndarray, sims: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """Greedy assignment of rows to groups by decreasing similarity, group g taking exactly sizes[g]."""
    room = sizes.copy()
    group = np.full(values.shape[0], -1, dtype=np.int64)
    for flat in np.argsort(-values, axis=None, kind="stable"):
        row, choice = divmod(int(flat), values.shape[1])
        target = indices[row, choice]
        if group[row] < 0 and room[target] > 0:
            group[row] = target
            room[target] -= 1
    for row in np.flatnonzero(group < 0):  # every choice was full: the closest group with room
        open_groups = np.flatnonzero(room > 0)
        target = open_groups[int(sims[row, open_groups].argmax())]
        group[row] = target
        room[target] -= 1
    assert (room == 0).all()
    return group
