"""Ranking metrics for one target per user, vectorised over users.

A rank is the 0-based position of the target in the ranked list, or -1 when the target is absent.

>>> import numpy as np
>>> ranks = target_ranks(np.array([[5, 3, 9], [1, 2, 4]]), np.array([3, 7]))
>>> ranks.tolist()
[1, -1]
>>> recall_at_k(ranks, 1), recall_at_k(ranks, 2)
(0.0, 0.5)
>>> round(ndcg_at_k(ranks, 2), 4)   # (1/log2(3) + 0) / 2
0.3155
>>> mrr(ranks)
0.25
"""

from __future__ import annotations

import numpy as np


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of each target in its row of `ranked` ([users, list_len]); -1 where absent.

    Rows may be padded with any id that is never a target (e.g. -1).
    """
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.ndim != 2 or targets.shape != (ranked.shape[0],):
        raise ValueError(f"ranked must be [users, k] and targets [users]; got {ranked.shape} and {targets.shape}")
    hits = ranked == targets[:, None]
    found = hits.any(axis=1)
    return np.where(found, hits.argmax(axis=1), -1)


def _check(ranks: np.ndarray, k: int | None = None) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return ranks


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of users whose target is within the first k positions (= HitRate@k for one target)."""
    ranks = _check(ranks, k)
    return float(np.mean((ranks >= 0) & (ranks < k)))


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean NDCG@k with one relevant item: 1/log2(rank+2) when rank < k, else 0 (the ideal DCG is 1)."""
    ranks = _check(ranks, k)
    hit = (ranks >= 0) & (ranks < k)
    gains = np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 0) + 2.0), 0.0)
    return float(np.mean(gains))


def mrr(ranks: np.ndarray, k: int | None = None) -> float:
    """Mean reciprocal rank (0 for a missing target, or one beyond position k when k is given)."""
    ranks = _check(ranks, k)
    hit = ranks >= 0 if k is None else (ranks >= 0) & (ranks < k)
    return float(np.mean(np.where(hit, 1.0 / (np.where(hit, ranks, 0) + 1.0), 0.0)))


def ranking_metrics(ranks: np.ndarray, ks: tuple[int, ...] = (1, 3, 5, 10)) -> dict[str, float]:
    """recall@k and ndcg@k for each k, plus mrr and the user count, as one flat dict."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    out["mrr"] = mrr(ranks)
    out["users"] = int(np.asarray(ranks).size)
    return out
