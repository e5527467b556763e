"""Residual quantisers (registered by name), the random last level that makes SIDs unique, and the SID report.

Every quantiser has the signature `fit(embeddings, levels, codebook_size, seed, **params) -> codes` with `codes`
an int64 array [items, levels]. `disambiguate` then appends one more level: within each group of items that share
all codes, each item gets a distinct random code (seeded), as the GR2 paper does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def balanced_assign(distances: np.ndarray, capacity: int) -> np.ndarray:
    """Labels [n] from squared distances [n, k] such that no code gets more than `capacity` points.

    Greedy rounds: every unassigned point asks for its nearest code that still has room; a code takes the
    closest askers it has room for. Each round either assigns everyone or fills a code, so at most k rounds.

    >>> balanced_assign(np.array([[0.0, 5.0], [1.0, 6.0], [2.0, 3.0]]), capacity=2).tolist()
    [0, 0, 1]
    """
    n, k = distances.shape
    if capacity * k < n:
        raise ValueError(f"{k} codes of capacity {capacity} cannot hold {n} points")
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity, dtype=np.int64)
    todo = np.arange(n)
    while len(todo):
        d = np.where(room[None, :] > 0, distances[todo], np.inf)
        choice = d.argmin(axis=1)
        by_code = np.lexsort((d[np.arange(len(todo)), choice], choice))
        chosen = choice[by_code]
        rank = np.arange(len(todo)) - np.searchsorted(chosen, chosen, side="left")
        accepted = rank < room[chosen]
        labels[todo[by_code[accepted]]] = chosen[accepted]
        room -= np.bincount(chosen[accepted], minlength=k)
        todo = np.sort(todo[by_code[~accepted]])
    return labels


def _squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :], 0.0)


def kmeans(
    x: np.ndarray, k: int, seed: int, max_iter: int = 100, n_init: int = 1, balance: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ initialised Lloyd's k-means (scikit-learn); returns (centroids [k, d], labels [n]).

    Fewer distinct points than `k` (a small catalogue, items with the same text, residuals that are all zero) fit
    one code per distinct point and leave the other codes unused. `balance` caps every code at `balance` times the
    average (points / codes): Lloyd's iterations then assign with `balanced_assign`, starting from the plain fit.
    """
    from sklearn.cluster import KMeans

    # float64 input: scikit-learn upcasts float32 distance blocks one chunk at a time, which is ~3x slower here
    x64 = np.asarray(x, dtype=np.float64)
    fit_k = min(k, len(np.unique(x64, axis=0)))
    model = KMeans(n_clusters=fit_k, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed)
    labels = model.fit_predict(x64).astype(np.int64)
    centroids = model.cluster_centers_
    if balance is not None and fit_k > 1:
        capacity = math.ceil(len(x64) / fit_k * balance)
        for _ in range(max_iter):  # Lloyd's iterations with the capped assignment (a fit within the cap stops at once)
            balanced = balanced_assign(_squared_distances(x64, centroids), capacity)
            counts = np.bincount(balanced, minlength=fit_k)
            sums = np.zeros_like(centroids)
            np.add.at(sums, balanced, x64)
            centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
            if np.array_equal(balanced, labels):
                break
            labels = balanced
    padded = np.zeros((k, x64.shape[1]), dtype=np.float32)
    padded[:fit_k] = centroids
    return padded, labels


def fit_rq_kmeans(
    embeddings: np.ndarray,
    levels: int,
    codebook_size: int,
    seed: int,
    max_iter: int = 100,
    n_init: int = 1,
    balance: float | None = None,
) -> np.ndarray:
    """RQ-KMeans: k-means on the embeddings, then on the residuals, level by level (`balance`: see `kmeans`)."""
    residual = np.asarray(embeddings, dtype=np.float32).copy()
    codes = np.zeros((len(residual), levels), dtype=np.int64)
    for level in range(levels):
        centroids, labels = kmeans(residual, codebook_size, seed + level, max_iter, n_init, balance)
        codes[:, level] = labels
        residual -= centroids[labels]
    return codes


def fit_codebook_size(codebook_size: int, items: int) -> int:
    """Codes per level a catalogue of `items` can fill: k-means needs an item per code, and a collision group (which
    the random last level spreads over distinct codes) never holds more than every item.

    >>> fit_codebook_size(256, 12101), fit_codebook_size(256, 30)
    (256, 30)
    """
    return max(1, min(codebook_size, items))


def _fit_rq_vae(embeddings: np.ndarray, levels: int, codebook_size: int, seed: int, **params: Any) -> np.ndarray:
    from rec.sid.rq_vae import fit_rq_vae  # torch training code, imported only when selected

    return fit_rq_vae(embeddings, levels=levels, codebook_size=codebook_size, seed=seed, **params)


QUANTIZERS: dict[str, Callable[..., np.ndarray]] = {"rq_kmeans": fit_rq_kmeans, "rq_vae": _fit_rq_vae}


def collision_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group index per item, size of each group) for items sharing the same code tuple."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def disambiguate(codes: np.ndarray, codebook_size: int, seed: int) -> np.ndarray:
    """Append a last level giving each item in a collision group a distinct random code in [0, codebook_size).

    >>> disambiguate(np.array([[1, 2], [1, 2], [3, 4]]), codebook_size=4, seed=0).shape
    (3, 3)
    """
    group, counts = collision_groups(codes)
    if counts.max() > codebook_size:
        raise ValueError(
            f"{counts.max()} items share one code tuple but the last level has only {codebook_size} codes; "
            "raise codebook_size or levels, or use a quantiser with better utilisation"
        )
    rng = np.random.default_rng(seed)
    last = np.zeros(len(codes), dtype=np.int64)
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for g in np.flatnonzero(counts > 0):
        members = order[starts[g] : starts[g] + counts[g]]
        last[members] = rng.choice(codebook_size, size=len(members), replace=False)
    return np.concatenate([codes, last[:, None]], axis=1)


def unique_fraction(codes: np.ndarray) -> float:
    """Distinct code tuples / items (1.0 = every item has its own SID)."""
    return float(len(np.unique(codes, axis=0)) / len(codes))


def entropy_bits(values: np.ndarray) -> float:
    """Shannon entropy of the distribution of `values`, in bits (log2 of the codes for a uniform spread).

    >>> entropy_bits(np.array([0, 1, 2, 3])), entropy_bits(np.array([5, 5, 5]))
    (2.0, 0.0)
    """
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))


def duplicate_titles(
    titles: Sequence[str | None], item_ids: Sequence[int], codes_before_last: np.ndarray, examples: int = 5
) -> dict[str, Any]:
    """Titles shared by more than one item (case and spacing ignored), the items involved, how many of those groups
    the quantiser could not tell apart (same codes on every quantised level), and the largest groups as examples.

    >>> duplicate_titles(["Cable", "cable ", "Hub", None], [7, 8, 9, 10], np.array([[1], [1], [2], [3]]))["examples"]
    [{'title': 'Cable', 'items': 2, 'item_ids': [7, 8], 'same_codes': True}]
    """
    groups: dict[str, list[int]] = {}
    for row, title in enumerate(titles):
        key = " ".join((title or "").split()).casefold()
        if key:
            groups.setdefault(key, []).append(row)
    shared = sorted((rows for rows in groups.values() if len(rows) > 1), key=lambda rows: (-len(rows), rows[0]))
    same_codes = [bool((codes_before_last[rows] == codes_before_last[rows[0]]).all()) for rows in shared]
    return {
        "titles_shared": len(shared),
        "items": sum(len(rows) for rows in shared),
        "groups_with_same_codes": sum(same_codes),
        "examples": [
            {"title": titles[rows[0]], "items": len(rows), "item_ids": [int(item_ids[r]) for r in rows[:5]],
             "same_codes": same}
            for rows, same in zip(shared[:examples], same_codes)
        ],
    }


def sid_report(
    codes_before_last: np.ndarray,
    codes: np.ndarray,
    codebook_size: int,
    titles: Sequence[str | None] | None = None,
    item_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Uniqueness, per-level code spread (utilisation, entropy against its maximum log2(codebook_size), share of the
    largest code), collision groups before the random last level and, given `titles`, duplicate titles."""
    _, counts = collision_groups(codes_before_last)
    shared = counts[counts > 1]
    levels = range(codes.shape[1])
    report = {
        "items": int(len(codes)),
        "levels": int(codes.shape[1]),
        "codebook_size": int(codebook_size),
        "unique_fraction": unique_fraction(codes),
        "unique_fraction_before_last_level": unique_fraction(codes_before_last),
        "utilisation_per_level": [float(len(np.unique(codes[:, level])) / codebook_size) for level in levels],
        "entropy_bits_per_level": [round(entropy_bits(codes[:, level]), 4) for level in levels],
        "entropy_max_bits": round(math.log2(codebook_size), 4),
        "largest_code_share_per_level": [
            round(float(np.bincount(codes[:, level]).max() / len(codes)), 4) for level in levels
        ],
        "max_collision_group": int(counts.max()),
        "collision_groups": int(len(shared)),
        "items_in_collision_groups": int(shared.sum()),
    }
    if titles is not None:
        ids = item_ids if item_ids is not None else range(len(titles))
        report["duplicate_titles"] = duplicate_titles(titles, ids, codes_before_last)
    return report
