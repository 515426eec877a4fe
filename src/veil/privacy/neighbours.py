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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TABLE_FORMAT = 2
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
) -> CandidateTable:
    """Greedy disjoint groups: each unassigned seed takes its k-1 closest unassigned eligible tokens.

    Seeds come in `seed_order` (CusText: corpus frequency), by default in token id order, which for BPE
    vocabularies is merge order and puts frequent tokens first (a "densest first" order was tried and gave
    common words worse groups). When fewer than 2k tokens remain they all join the last group: sizes lie
    in [k, 2k-1]."""
    eligible_ids = np.flatnonzero(eligible)
    if eligible_ids.size < k:
        raise ValueError(f"k={k} exceeds the {eligible_ids.size} eligible tokens")
    shortlist = top_k_neighbours(
        vectors, eligible, k=min(4 * k, eligible_ids.size), metric=metric, progress=progress
    )
    order = eligible_ids if seed_order is None else _complete_order(seed_order, eligible)
    assigned = ~eligible.copy()
    pool = eligible_ids
    groups: list[np.ndarray] = []
    remaining = eligible_ids.size
    for seed in order:
        if assigned[seed]:
            continue
        if remaining < 2 * k:
            members = np.flatnonzero(~assigned)
        else:
            members = [int(t) for t in shortlist[seed] if not assigned[t]][:k]
            if seed not in members:
                members = [int(seed), *members][:k]
            if len(members) < k:
                pool = pool[~assigned[pool]]
                members = _nearest_unassigned(vectors, seed, pool, k, metric)
            members = np.asarray(members)
        assigned[members] = True
        remaining -= members.size
        groups.append(members)
        if progress is not None and len(groups) % 200 == 0:
            progress("groups", eligible_ids.size - remaining, eligible_ids.size)
    return _group_table(shortlist[:, 0], groups, vectors.shape[0])


def _complete_order(seed_order: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """`seed_order`'s eligible tokens first, then every other eligible token by id."""
    first = np.asarray([t for t in dict.fromkeys(int(t) for t in seed_order) if eligible[t]], dtype=np.int64)
    rest = np.setdiff1d(np.flatnonzero(eligible), first, assume_unique=False)
    return np.concatenate([first, rest])


def _nearest_unassigned(
    vectors: np.ndarray, seed: int, pool: np.ndarray, k: int, metric: Metric
) -> np.ndarray:
    sims = _closeness(vectors[[seed]], vectors[pool], metric)[0]
    sims[pool == seed] = np.inf  # the seed always belongs to its own group
    return pool[np.argpartition(-sims, k - 1)[:k]]


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


def stderr_progress() -> ProgressFn:
    """A progress callback printing `stage done/total (elapsed)` on stderr, at most twice a second."""
    started, last = time.monotonic(), [0.0]

    def report(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5 or done >= total:
            last[0] = now
            print(f"\r[cmif] {stage} {done}/{total} ({now - started:.0f} s)", end="", file=sys.stderr)
            if done >= total:
                print(file=sys.stderr)

    return report
