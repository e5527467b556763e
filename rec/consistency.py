"""Candidate orders for the re-ranker: seeded shuffles of a list, and one ranking from the rankings of several orders.

A small listwise re-ranker leans on the order it is shown: when the first stage is good, copying its order scores
well. Two levers use the same seeded shuffles:

- prompts that list the candidates shuffled (the prompt section's `shuffle_candidates`: SFT, RL rollouts, and the
  readers of a model trained so), so that a position says nothing about the answer:
  `shuffled(candidates, list_key(history, candidates))`;
- permutation self-consistency at inference (Tang et al., arXiv 2310.07712): re-rank K orders of each list (the
  incoming one and K - 1 seeded shuffles, `candidate_orders`), then aggregate the K rankings into one (`borda`:
  Borda count, ties broken by the incoming, pre-rank, position).

A shuffle depends only on its key (a list's content, or the seed and row id), so a rerun shows every list in the same
order.

>>> items = list(range(10))
>>> shuffled(items, 0, 3) == shuffled(items, 0, 3) != shuffled(items, 0, 4)
True
>>> candidate_orders([7, 8, 9], 1, 0, 3)
[[7, 8, 9]]
>>> borda([[9, 8, 7], [8, 9, 7]], incoming=[7, 8, 9])  # 9 and 8 tie on points: 8 came first in the incoming list
[8, 9, 7]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import numpy as np


def list_key(history: Sequence[int], candidates: Sequence[int]) -> int:
    """A stable integer of one list (its history and candidates, in order): the same in every process and rerun."""
    ids = json.dumps([[int(i) for i in history], [int(i) for i in candidates]])
    return int.from_bytes(hashlib.sha256(ids.encode()).digest()[:8], "little")


def shuffled(candidates: Sequence[int], *key: int) -> list[int]:
    """`candidates` in a seeded random order; the same key always gives the same order (keys are ints >= 0)."""
    order = np.random.default_rng([int(k) for k in key]).permutation(len(candidates))
    return [candidates[int(i)] for i in order]


def candidate_orders(candidates: Sequence[int], orders: int, *key: int) -> list[list[int]]:
    """`orders` orders of one list: the incoming order first, then `orders - 1` seeded shuffles (keys `*key, k`)."""
    if orders < 1:
        raise ValueError(f"orders must be >= 1, got {orders}")
    return [list(candidates)] + [shuffled(candidates, *key, k) for k in range(1, orders)]


def borda(rankings: Sequence[Sequence[int]], incoming: Sequence[int]) -> list[int]:
    """One ranking of `incoming`'s items from several rankings of them: each ranking gives an item n - 1 - its
    position points; most points first, ties by position in `incoming`. One ranking comes back unchanged."""
    if not rankings:
        raise ValueError("borda needs at least one ranking")
    items = set(incoming)
    points = dict.fromkeys(incoming, 0)
    for ranking in rankings:
        if len(ranking) != len(incoming) or set(ranking) != items:
            raise ValueError(f"{list(ranking)} is not a permutation of the incoming list {list(incoming)}")
        for position, item in enumerate(ranking):
            points[item] += len(incoming) - 1 - position
    first_seen = {item: position for position, item in enumerate(incoming)}
    return sorted(incoming, key=lambda item: (-points[item], first_seen[item]))


AGGREGATES: dict[str, Callable[[Sequence[Sequence[int]], Sequence[int]], list[int]]] = {"borda": borda}
"""Aggregations by name (an evaluate model's `self_consistency.aggregate`)."""
