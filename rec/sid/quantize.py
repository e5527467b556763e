"""Residual quantisers (registered by name), the random last level that makes SIDs unique, and the SID report.

Every quantiser has the signature `fit(embeddings, levels, codebook_size, seed, **params) -> codes` with `codes`
an int64 array [items, levels]. `disambiguate` then appends one more level: within each group of items that share
all codes, each item gets a distinct random code (seeded), as the GR2 paper does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def kmeans(x: np.ndarray, k: int, seed: int, max_iter: int = 100, n_init: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ initialised Lloyd's k-means (scikit-learn); returns (centroids [k, d], labels [n])."""
    from sklearn.cluster import KMeans

    if len(x) < k:
        raise ValueError(f"cannot fit {k} clusters on {len(x)} points; lower codebook_size")
    model = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed)
    # float64 input: scikit-learn upcasts float32 distance blocks one chunk at a time, which is ~3x slower here
    labels = model.fit_predict(x.astype(np.float64))
    return model.cluster_centers_.astype(np.float32), labels.astype(np.int64)


def fit_rq_kmeans(
    embeddings: np.ndarray, levels: int, codebook_size: int, seed: int, max_iter: int = 100, n_init: int = 1
) -> np.ndarray:
    """RQ-KMeans: k-means on the embeddings, then on the residuals, level by level."""
    residual = np.asarray(embeddings, dtype=np.float32).copy()
    codes = np.zeros((len(residual), levels), dtype=np.int64)
    for level in range(levels):
        centroids, labels = kmeans(residual, codebook_size, seed + level, max_iter=max_iter, n_init=n_init)
        codes[:, level] = labels
        residual -= centroids[labels]
    return codes


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


def sid_report(codes_before_last: np.ndarray, codes: np.ndarray, codebook_size: int) -> dict[str, Any]:
    """Uniqueness, per-level codebook utilisation and the largest collision group."""
    _, counts = collision_groups(codes_before_last)
    return {
        "items": int(len(codes)),
        "levels": int(codes.shape[1]),
        "codebook_size": int(codebook_size),
        "unique_fraction": unique_fraction(codes),
        "unique_fraction_before_last_level": unique_fraction(codes_before_last),
        "utilisation_per_level": [
            float(len(np.unique(codes[:, level])) / codebook_size) for level in range(codes.shape[1])
        ],
        "max_collision_group": int(counts.max()),
    }
