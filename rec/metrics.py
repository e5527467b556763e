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


def order_agreement(ranking: list[int], reference: list[int]) -> float:
    """Kendall's tau between two orders of the same items: 1 the same order, -1 reversed, ~0 unrelated (1 for a
    list of fewer than two items).

    >>> order_agreement([1, 2, 3], [1, 2, 3]), order_agreement([3, 2, 1], [1, 2, 3]), order_agreement([2, 1, 3], [1, 2, 3])
    (1.0, -1.0, 0.3333333333333333)
    """
    if sorted(ranking) != sorted(reference):
        raise ValueError(f"{list(ranking)} and {list(reference)} are not orders of the same items")
    position = {item: n for n, item in enumerate(reference)}
    seq = [position[item] for item in ranking]
    pairs = len(seq) * (len(seq) - 1) // 2
    if pairs == 0:
        return 1.0
    concordant = sum(seq[i] < seq[j] for i in range(len(seq)) for j in range(i + 1, len(seq)))
    return (2 * concordant - pairs) / pairs


def random_order_ndcg(list_lengths: np.ndarray, k: int) -> float:
    """Mean NDCG@k that a uniformly random order of each list scores in expectation, when every list holds its one
    target: (1/n) * sum over the first min(k, n) positions of 1/log2(position + 2), averaged over the lists.

    >>> round(random_order_ndcg(np.array([2, 10]), 5), 4)   # (0.8155 for 2 items + 0.2949 for 10) / 2
    0.5552
    """
    lengths = _check(np.asarray(list_lengths), k)
    if (lengths < 1).any():
        raise ValueError("every list needs at least one item")
    gains = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))
    return float(np.mean(gains[np.minimum(lengths, k) - 1] / lengths))
