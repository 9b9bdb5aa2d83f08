"""Pairs of embeddings above a cosine threshold, with faiss.

Exact: inner-product range search on a flat index (all pairs, no misses); cost grows as N^2, so above
``exact_max`` vectors an IVF index (inverted lists over k-means cells, ``nprobe`` cells searched per
query) is used instead. Its recall against exact search is estimated on a random sample of queries,
where exact search costs only sample x N, and reported with the result.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EXACT_MAX = 50_000


@dataclass
class PairSearch:
    i: np.ndarray  # int64, i < j
    j: np.ndarray
    sim: np.ndarray  # float32
    index: str  # "flat" | "ivf<nlist>,nprobe<p>"
    seconds: float
    recall: float | None = None  # sampled recall vs exact (approximate index only)
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pairs": len(self.i),
            "index": self.index,
            "seconds": round(self.seconds, 3),
            "recall_vs_exact": self.recall,
            **self.stats,
        }


def _faiss():
    from ..errors import require

    return require("faiss", "clip", "faiss-cpu")


def _pairs_from_range(lims: np.ndarray, d: np.ndarray, ids: np.ndarray, q_ids: np.ndarray):
    counts = np.diff(lims).astype(np.int64)
    qi = np.repeat(q_ids, counts)
    keep = qi < ids  # each pair once, no self-matches
    return qi[keep].astype(np.int64), ids[keep].astype(np.int64), d[keep].astype(np.float32)


def _dedupe_pairs(i: np.ndarray, j: np.ndarray, s: np.ndarray, n: int):
    if len(i) == 0:
        return i, j, s
    key = i * n + j
    key, first = np.unique(key, return_index=True)
    return key // n, key % n, s[first]


def exact_pairs(emb: np.ndarray, threshold: float, block: int = 4096):
    """All (i < j) with inner product >= threshold, by flat range search in query blocks."""
    faiss = _faiss()
    x = np.ascontiguousarray(emb, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    out_i, out_j, out_s = [], [], []
    for s in range(0, len(x), block):
        lims, d, ids = index.range_search(x[s : s + block], float(threshold))
        a, b, c = _pairs_from_range(lims, d, ids, np.arange(s, min(s + block, len(x))))
        out_i.append(a)
        out_j.append(b)
        out_s.append(c)
    if not out_i:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def ivf_index(emb: np.ndarray, nlist: int | None = None, nprobe: int | None = None, seed: int = 0):
    faiss = _faiss()
    x = np.ascontiguousarray(emb, dtype=np.float32)
    n, dim = x.shape
    nlist = nlist or max(16, int(4 * math.sqrt(n)))
    quant = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = x[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
    index.cp.seed = seed
    index.train(train)
    index.add(x)
    index.nprobe = nprobe or max(1, min(nlist, 16))
    return index


def approx_pairs(emb: np.ndarray, threshold: float, *, nlist=None, nprobe=None, block: int = 8192):
    index = ivf_index(emb, nlist, nprobe)
    x = np.ascontiguousarray(emb, dtype=np.float32)
    out_i, out_j, out_s = [], [], []
    for s in range(0, len(x), block):
        q = x[s : s + block]
        lims, d, ids = index.range_search(q, float(threshold))
        counts = np.diff(lims).astype(np.int64)
        qi = np.repeat(np.arange(s, s + len(q)), counts)
        # IVF is not symmetric (i may find j while j misses i): keep both directions, order, dedupe.
        a, b = np.minimum(qi, ids), np.maximum(qi, ids)
        keep = a != b
        out_i.append(a[keep].astype(np.int64))
        out_j.append(b[keep].astype(np.int64))
        out_s.append(d[keep].astype(np.float32))
    i, j, s = (np.concatenate(v) for v in (out_i, out_j, out_s))
    i, j, s = _dedupe_pairs(i, j, s, len(x))
    return i, j, s, index


def sampled_recall(emb: np.ndarray, threshold: float, i: np.ndarray, j: np.ndarray, n_queries: int = 1000,
                   seed: int = 0) -> tuple[float | None, int]:  # fmt: skip
    """Share of the exact pairs touching a random sample of queries that the found pairs contain."""
    faiss = _faiss()
    x = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(x)
    q = np.random.default_rng(seed).choice(n, size=min(n, n_queries), replace=False)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    lims, _, ids = flat.range_search(x[q], float(threshold))
    qi = np.repeat(q, np.diff(lims).astype(np.int64))
    keep = qi != ids
    a, b = np.minimum(qi[keep], ids[keep]), np.maximum(qi[keep], ids[keep])
    truth = set(zip(a.tolist(), b.tolist(), strict=True))
    if not truth:
        return None, 0
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    return len(truth & found) / len(truth), len(truth)


def similar_pairs(
    emb: np.ndarray,
    threshold: float,
    *,
    exact_max: int = EXACT_MAX,
    index: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
) -> PairSearch:
    """Pairs with cosine similarity >= threshold among L2-normalised rows of ``emb``."""
    t0 = time.perf_counter()
    n = len(emb)
    if n < 2:
        z = np.zeros(0, np.int64)
        return PairSearch(z, z, np.zeros(0, np.float32), "flat", 0.0)
    use_exact = index == "flat" or (index == "auto" and n <= exact_max)
    if use_exact:
        i, j, s = exact_pairs(emb, threshold)
        return PairSearch(i, j, s, "flat", time.perf_counter() - t0)
    i, j, s, ivf = approx_pairs(emb, threshold, nlist=nlist, nprobe=nprobe)
    secs = time.perf_counter() - t0
    recall, n_truth = sampled_recall(emb, threshold, i, j)
    name = f"ivf{ivf.nlist},nprobe{ivf.nprobe}"
    return PairSearch(i, j, s, name, secs, recall, {"recall_sample_pairs": n_truth})


def knn_mean_similarity(emb: np.ndarray, k: int = 10) -> np.ndarray:
    """Mean cosine similarity of each row to its k nearest other rows (exact, flat index)."""
    faiss = _faiss()
    x = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(x)
    k = max(1, min(k, n - 1))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    d, ids = index.search(x, k + 1)
    # Drop the self match (it may not be first when exact copies tie), keep k others.
    self_hit = ids == np.arange(n)[:, None]
    d = np.where(self_hit, np.nan, d)
    out = np.empty(n, np.float32)
    for r in range(n):  # n rows of k+1 values: cheap
        row = d[r][~np.isnan(d[r])][:k]
        out[r] = row.mean() if len(row) else np.nan
    return out
