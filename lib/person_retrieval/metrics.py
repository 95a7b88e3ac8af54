"""Retrieval metrics: Rank-k, mAP and mINP as IRRA defines them, exact search with torch or faiss, and
dialogue-retrieval metrics over rounds (per-round Recall@k, cumulative Hits@k, BRI).

Definitions (for one query, with the gallery sorted by descending similarity and ``m_j`` = 1 when the
item at rank ``j`` (1-based) has the query's person id):

* Rank-k (R@k): 1 if any of the first k items match.
* AP = (1 / #matches) * sum_j m_j * (matches among the first j) / j; mAP is its mean over queries.
* INP = #matches / (rank of the last match); mINP is its mean (Zheng et al.'s negative-penalty score).

All are reported in percent. Ties are broken by gallery order (a stable sort), so results do not
depend on the backend. Queries with no match in the gallery are an error: IRRA's code silently
divides by zero there, and a gallery missing a query's person is almost always a data bug.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "retrieval_metrics", "rank_metrics", "retrieval_metrics_from_features", "search", "search_faiss",
    "search_torch", "dialogue_metrics", "first_match_ranks",
]


def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def _check_pids(q_pids: torch.Tensor, g_pids: torch.Tensor, shape: tuple[int, int]) -> None:
    if q_pids.ndim != 1 or g_pids.ndim != 1:
        raise ValueError("query_pids and gallery_pids must be 1-D")
    if shape != (len(q_pids), len(g_pids)):
        raise ValueError(
            f"similarity has shape {tuple(shape)} but there are {len(q_pids)} query pids and {len(g_pids)} gallery pids; "
            "expected similarity[i, j] = score of gallery item j for query i"
        )


class _Accumulator:
    """Sums per-query CMC hits, AP and INP over chunks of ranked matches."""

    def __init__(self, ks: Sequence[int]):
        self.ks = tuple(int(k) for k in ks)
        self.hits = {k: 0.0 for k in self.ks}
        self.ap = 0.0
        self.inp = 0.0
        self.n = 0

    def add(self, matches: torch.Tensor, row_offset: int = 0) -> None:
        # matches: (chunk, G) bool, gallery in ranked order.
        num_rel = matches.sum(1)
        if bool((num_rel == 0).any()):
            bad = int(torch.nonzero(num_rel == 0)[0, 0]) + row_offset
            raise ValueError(
                f"query {bad} has no matching item in the gallery (no gallery pid equals its pid); "
                "every query's person must appear in the gallery"
            )
        G = matches.shape[1]
        for k in self.ks:
            self.hits[k] += float(matches[:, : min(k, G)].any(1).sum())
        cum = matches.cumsum(1, dtype=torch.int32)
        ranks = torch.arange(1, G + 1, dtype=torch.float32)
        mf = matches.float()
        self.ap += float(((cum.float() / ranks) * mf).sum(1).div(num_rel.float()).sum())
        last = G - 1 - torch.flip(matches, dims=[1]).float().argmax(1)  # index of the last match
        self.inp += float((num_rel.float() / (last.float() + 1.0)).sum())
        self.n += matches.shape[0]

    def result(self) -> dict[str, float]:
        out = {f"R{k}": 100.0 * self.hits[k] / self.n for k in self.ks}
        out["mAP"] = 100.0 * self.ap / self.n
        out["mINP"] = 100.0 * self.inp / self.n
        return out


def rank_metrics(ranking, query_pids, gallery_pids, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Metrics from a full ranking: ``ranking[i]`` lists all gallery indices for query ``i``, best first."""
    ranking = _as_tensor(ranking, torch.long)
    q, g = _as_tensor(query_pids), _as_tensor(gallery_pids)
    if ranking.shape[1] != len(g):
        raise ValueError(f"ranking has {ranking.shape[1]} columns; mAP and mINP need the full gallery ({len(g)})")
    acc = _Accumulator(ks)
    acc.add(g[ranking] == q.view(-1, 1))
    return acc.result()


def retrieval_metrics(similarity, query_pids, gallery_pids, ks: Sequence[int] = (1, 5, 10), chunk: int = 512) -> dict[str, float]:
    """R@k, mAP and mINP (percent) from a ``(queries, gallery)`` similarity matrix, ``chunk`` queries at a time."""
    sim = _as_tensor(similarity, torch.float32)
    q, g = _as_tensor(query_pids), _as_tensor(gallery_pids)
    _check_pids(q, g, tuple(sim.shape))
    acc = _Accumulator(ks)
    for s in range(0, sim.shape[0], chunk):
        block = sim[s: s + chunk]
        order = torch.sort(block, dim=1, descending=True, stable=True).indices
        acc.add(g[order] == q[s: s + chunk].view(-1, 1), row_offset=s)
    return acc.result()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def retrieval_metrics_from_features(query_feats, gallery_feats, query_pids, gallery_pids, ks=(1, 5, 10),
                                    backend: str = "torch", chunk: int = 512, normalize: bool = True) -> dict[str, float]:
    """Metrics from features (cosine similarity when ``normalize``), never holding the full matrix.

    ``backend="faiss"`` ranks with a faiss exact inner-product index; ``"torch"`` with matmul and a sort.
    Both break ties by gallery order only up to floating-point equality; on real features they agree.
    """
    qf, gf = _as_tensor(query_feats), _as_tensor(gallery_feats)
    if normalize:
        qf, gf = _normalize(qf), _normalize(gf)
    q, g = _as_tensor(query_pids), _as_tensor(gallery_pids)
    _check_pids(q, g, (qf.shape[0], gf.shape[0]))
    acc = _Accumulator(ks)
    G = gf.shape[0]
    index = _faiss_index(gf) if backend == "faiss" else None
    if backend not in ("torch", "faiss"):
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
    for s in range(0, qf.shape[0], chunk):
        if index is not None:
            _, order = index.search(qf[s: s + chunk].numpy().astype(np.float32), G)
            order = torch.from_numpy(order)
        else:
            order = torch.sort(qf[s: s + chunk] @ gf.T, dim=1, descending=True, stable=True).indices
        acc.add(g[order] == q[s: s + chunk].view(-1, 1), row_offset=s)
    return acc.result()


# ---------------------------------------------------------------------------------------------
def _faiss_index(gallery: torch.Tensor):
    import faiss  # imported lazily: only this path needs it

    x = np.ascontiguousarray(gallery.detach().cpu().numpy().astype(np.float32))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def search_faiss(query, gallery, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with faiss. Returns ``(scores, indices)``, each ``(Q, k)``."""
    index = _faiss_index(_as_tensor(gallery))
    q = np.ascontiguousarray(_as_tensor(query).detach().cpu().numpy().astype(np.float32))
    return index.search(q, min(k, index.ntotal))


def search_torch(query, gallery, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with torch (chunked matmul + topk). Same output as :func:`search_faiss`."""
    qf, gf = _as_tensor(query).float(), _as_tensor(gallery).float()
    k = min(k, gf.shape[0])
    scores, idx = [], []
    for s in range(0, qf.shape[0], chunk):
        v, i = torch.topk(qf[s: s + chunk] @ gf.T, k, dim=1)
        scores.append(v)
        idx.append(i)
    return torch.cat(scores).numpy(), torch.cat(idx).numpy()


def search(query, gallery, k: int, backend: str = "faiss"):
    """Exact inner-product top-k search over a gallery; ``backend`` is ``"faiss"`` or ``"torch"``."""
    if backend == "faiss":
        return search_faiss(query, gallery, k)
    if backend == "torch":
        return search_torch(query, gallery, k)
    raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")


# ---------------------------------------------------------------------------------------------
def first_match_ranks(similarity, query_pids, gallery_pids) -> np.ndarray:
    """1-based rank of the first matching gallery item for each query (ties broken by gallery order)."""
    sim = _as_tensor(similarity, torch.float32)
    q, g = _as_tensor(query_pids), _as_tensor(gallery_pids)
    _check_pids(q, g, tuple(sim.shape))
    match = g.view(1, -1) == q.view(-1, 1)
    if bool((~match.any(1)).any()):
        raise ValueError("some query has no matching item in the gallery")
    best = torch.where(match, sim, torch.full_like(sim, -math.inf)).max(1)
    # rank = 1 + items scoring strictly higher + equal-scoring items that come earlier in the gallery
    target = best.values.view(-1, 1)
    pos = best.indices.view(-1, 1)
    idx = torch.arange(sim.shape[1]).view(1, -1)
    ahead = (sim > target) | ((sim == target) & (idx < pos))
    return (ahead.sum(1) + 1).numpy()


def dialogue_metrics(similarities: Sequence, query_pids, gallery_pids, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Metrics over dialogue rounds. ``similarities[r]`` is the ``(queries, gallery)`` similarity after round r.

    Returns a dict with, per round r (lists over rounds):
      * ``recall@k``: percent of queries whose target is in the top k after round r;
      * ``hits@k``: percent of queries whose target reached the top k at some round <= r (ChatIR's
        cumulative Hits@k: a query counts from the first round it succeeds);
      * ``BRI``: mean over queries of the mean over rounds 0..r of log(best rank so far), PlugIR's
        Best log Rank Integral (lower is better; 0 means rank 1 from the first round).
    """
    ranks = np.stack([first_match_ranks(s, query_pids, gallery_pids) for s in similarities])  # (R, Q)
    best = np.minimum.accumulate(ranks, axis=0)
    out: dict = {}
    for k in ks:
        out[f"recall@{k}"] = [float(100.0 * (r <= k).mean()) for r in ranks]
        out[f"hits@{k}"] = [float(100.0 * (b <= k).mean()) for b in best]
    logb = np.log(best.astype(np.float64))
    out["BRI"] = [float(logb[: r + 1].mean(0).mean()) for r in range(len(ranks))]
    out["ranks"] = ranks
    return out
