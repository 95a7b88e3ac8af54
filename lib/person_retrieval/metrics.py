"""Retrieval metrics: Rank-k, mAP and mINP as IRRA defines them, exact search with torch or faiss, and
dialogue-retrieval metrics over rounds (per-round Recall@k, cumulative Hits@k, BRI).

Definitions (for one query, with the gallery sorted by descending similarity and ``m_j`` = 1 when the
item at rank ``j`` (1-based) has the query's person id):

* Rank-k (R@k): 1 if any of the first k items match.
* AP = (1 / #matches) * sum_j m_j * (matches among the first j) / j; mAP is its mean over queries.
* INP = #matches / (rank of the last match); mINP is its mean (Zheng et al.'s negative-penalty score).

All are reported in percent. Ties are broken by gallery order (a stable sort), so results do not
depend on the backend. Only the ranks of the matches are needed, so the torch path counts, for each
match, the gallery items that score higher instead of sorting the gallery: exact, and several times
faster on large galleries. Queries with no match in the gallery are an error: IRRA's code silently
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
    """Sums R@k hits, AP and INP over chunks of queries, from the 1-based rank of every match."""

    def __init__(self, ks: Sequence[int]):
        self.ks = tuple(int(k) for k in ks)
        self.hits = {k: 0.0 for k in self.ks}
        self.ap = 0.0
        self.inp = 0.0
        self.n = 0

    def add_ranks(self, ranks: torch.Tensor, num_rel: torch.Tensor, row_offset: int = 0) -> None:
        """``ranks``: (chunk, M) ascending ranks of each query's matches, padded with +inf past ``num_rel``."""
        if bool((num_rel == 0).any()):
            bad = int(torch.nonzero(num_rel == 0)[0, 0]) + row_offset
            raise ValueError(
                f"query {bad} has no matching item in the gallery (no gallery pid equals its pid); "
                "every query's person must appear in the gallery"
            )
        ranks = ranks.double()
        for k in self.ks:
            self.hits[k] += float((ranks[:, 0] <= k).sum())
        j = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)
        valid = j.view(1, -1) <= num_rel.view(-1, 1)
        prec = torch.where(valid, j / ranks, torch.zeros_like(ranks))  # precision at each match
        self.ap += float((prec.sum(1) / num_rel).sum())
        last = ranks.gather(1, (num_rel - 1).view(-1, 1)).squeeze(1)
        self.inp += float((num_rel / last).sum())
        self.n += ranks.shape[0]

    def result(self) -> dict[str, float]:
        out = {f"R{k}": 100.0 * self.hits[k] / self.n for k in self.ks}
        out["mAP"] = 100.0 * self.ap / self.n
        out["mINP"] = 100.0 * self.inp / self.n
        return out


def _ranks_from_ranking(matches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Match ranks from a (chunk, G) boolean matrix in ranked order."""
    num_rel = matches.sum(1)
    pos = torch.arange(1, matches.shape[1] + 1, dtype=torch.float64).expand_as(matches)
    r = torch.where(matches, pos, torch.full_like(pos, math.inf))
    m = max(int(num_rel.max()), 1)
    return torch.topk(r, m, dim=1, largest=False, sorted=True).values, num_rel


def _ranks_from_scores(sim: torch.Tensor, matches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Match ranks without sorting the gallery: the rank of a match scoring s at gallery index i is
    1 + #(scores > s) + #(scores == s at an earlier index), exactly its place in a stable sort."""
    num_rel = matches.sum(1)
    m = max(int(num_rel.max()), 1)
    masked = torch.where(matches, sim, torch.full_like(sim, -math.inf))
    vals, idx = torch.topk(masked, m, dim=1, sorted=True)
    col = torch.arange(sim.shape[1]).view(1, -1)
    ranks = torch.full(vals.shape, math.inf, dtype=torch.float64)
    for j in range(m):
        v, i = vals[:, j: j + 1], idx[:, j: j + 1]
        r = (sim > v).sum(1, dtype=torch.int32) + 1
        ties = (sim == v).sum(1, dtype=torch.int32) > 1  # another item scores exactly the same
        if bool(ties.any()):
            r[ties] += ((sim[ties] == v[ties]) & (col < i[ties])).sum(1, dtype=torch.int32)
        ranks[:, j] = torch.where(j < num_rel, r.double(), torch.tensor(math.inf, dtype=torch.float64))
    return torch.sort(ranks, dim=1).values, num_rel


def rank_metrics(ranking, query_pids, gallery_pids, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Metrics from a full ranking: ``ranking[i]`` lists all gallery indices for query ``i``, best first."""
    ranking = _as_tensor(ranking, torch.long)
    q, g = _as_tensor(query_pids), _as_tensor(gallery_pids)
    if ranking.shape[1] != len(g):
        raise ValueError(f"ranking has {ranking.shape[1]} columns; mAP and mINP need the full gallery ({len(g)})")
    acc = _Accumulator(ks)
    acc.add_ranks(*_ranks_from_ranking(g[ranking] == q.view(-1, 1)))
    return acc.result()


def retrieval_metrics(similarity, query_pids, gallery_pids, ks: Sequence[int] = (1, 5, 10), chunk: int = 512) -> dict[str, float]:
    """R@k, mAP and mINP (percent) from a ``(queries, gallery)`` similarity matrix, ``chunk`` queries at a time."""
    sim = _as_tensor(similarity, torch.float32)
    q, g = _as_tensor(query_pids), _as_tensor(gallery_pids)
    _check_pids(q, g, tuple(sim.shape))
    acc = _Accumulator(ks)
    for s in range(0, sim.shape[0], chunk):
        block = sim[s: s + chunk]
        acc.add_ranks(*_ranks_from_scores(block, g.view(1, -1) == q[s: s + chunk].view(-1, 1)), row_offset=s)
    return acc.result()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def retrieval_metrics_from_features(query_feats, gallery_feats, query_pids, gallery_pids, ks=(1, 5, 10),
                                    backend: str = "torch", chunk: int = 512, normalize: bool = True) -> dict[str, float]:
    """Metrics from features (cosine similarity when ``normalize``), never holding the full matrix.

    ``backend="torch"`` scores a chunk of queries by matmul and counts each match's rank (fast; no sort).
    ``backend="faiss"`` asks a faiss exact inner-product index for the whole gallery in ranked order
    (an independent check of the torch path; slower, since a full ranking is a sort). They agree up to
    the order of floating-point ties.
    """
    qf, gf = _as_tensor(query_feats), _as_tensor(gallery_feats)
    if normalize:
        qf, gf = _normalize(qf), _normalize(gf)
    q, g = _as_tensor(query_pids), _as_tensor(gallery_pids)
    _check_pids(q, g, (qf.shape[0], gf.shape[0]))
    acc = _Accumulator(ks)
    G = gf.shape[0]
    if backend not in ("torch", "faiss"):
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
    index = _faiss_index(gf) if backend == "faiss" else None
    for s in range(0, qf.shape[0], chunk):
        qp = q[s: s + chunk].view(-1, 1)
        if index is not None:  # faiss returns the whole gallery in ranked order
            _, order = index.search(np.ascontiguousarray(qf[s: s + chunk].numpy(), dtype=np.float32), G)
            acc.add_ranks(*_ranks_from_ranking(g[torch.from_numpy(order)] == qp), row_offset=s)
        else:  # torch: scores, then each match's rank by counting (no sort of the gallery)
            acc.add_ranks(*_ranks_from_scores(qf[s: s + chunk] @ gf.T, g.view(1, -1) == qp), row_offset=s)
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


# ---------------------------------------------------------------------------------------------
# Distribution distance (generated against real images, on any encoder's features)
def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` between Gaussians fitted to
    the rows of ``a`` and ``b`` (computed in float64; the inner root is symmetric, so exact via eigh)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] feature sets of one width, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least two rows")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    ra = _sqrtm_psd(sa)
    cross = _sqrtm_psd(ra @ sb @ ra)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(sa) + torch.trace(sb) - 2 * torch.trace(cross))


def head_accuracy(predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracy (%) of predicted class indices over the images where the head is visible
    (target -1: hidden; a head visible nowhere is left out)."""
    acc = {}
    for h, t in targets.items():
        ok = t >= 0
        if ok.any():
            acc[h] = float((predictions[h][ok] == t[ok]).float().mean() * 100)
    return acc
