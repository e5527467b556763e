"""Candidate orders (pure): seeded shuffles, the orders of self-consistency, and Borda aggregation."""

from __future__ import annotations

import pytest

from rec.consistency import AGGREGATES, borda, candidate_orders, list_key, shuffled

ITEMS = list(range(100, 110))


def test_shuffles_are_seeded_permutations_that_a_rerun_repeats():
    first = shuffled(ITEMS, 0, 7)
    assert sorted(first) == ITEMS and first != ITEMS
    assert shuffled(ITEMS, 0, 7) == first and shuffled(ITEMS, 1, 7) != first and shuffled(ITEMS, 0, 8) != first
    # the prompt's shuffle is keyed by the list itself: fixed across processes and releases (a change would reshuffle
    # every prompt of a model trained with shuffle_candidates)
    assert list_key([1, 2], [3, 4]) == 12253737054567343390
    assert list_key([1, 2], [3, 4]) != list_key([1, 2], [4, 3]) != list_key([2, 1], [4, 3])


def test_self_consistency_orders_start_with_the_incoming_one():
    orders = candidate_orders(ITEMS, 4, 0, 5)
    assert len(orders) == 4 and orders[0] == ITEMS
    assert all(sorted(order) == ITEMS for order in orders)
    assert len({tuple(order) for order in orders}) == 4
    assert orders == candidate_orders(ITEMS, 4, 0, 5) and orders[1:] != candidate_orders(ITEMS, 4, 0, 6)[1:]
    with pytest.raises(ValueError, match="orders must be >= 1"):
        candidate_orders(ITEMS, 0, 0, 5)


def test_borda_counts_points_and_breaks_ties_by_the_incoming_order():
    incoming = [1, 2, 3, 4]
    assert borda([[4, 3, 2, 1]], incoming) == [4, 3, 2, 1]  # one ranking comes back as it is
    assert borda([[4, 3, 2, 1], [1, 2, 3, 4]], incoming) == [1, 2, 3, 4]  # all tied: the incoming order
    # points 3, 2, 1, 0 by position: 3 has 3 + 3 + 2, 1 has 2 + 0 + 3, 4 has 0 + 2 + 1, 2 has 1 + 1 + 0
    assert borda([[3, 1, 2, 4], [3, 4, 2, 1], [1, 3, 4, 2]], incoming) == [3, 1, 4, 2]
    assert AGGREGATES["borda"] is borda
    with pytest.raises(ValueError, match="not a permutation"):
        borda([[1, 2, 3]], incoming)
    with pytest.raises(ValueError, match="at least one"):
        borda([], incoming)


def test_a_ranker_that_ignores_position_is_unchanged_by_self_consistency():
    """A ranker that orders by content (here: by item id, descending) gives the same ranking for every order shown,
    so the aggregate of its K answers is that ranking; a ranker that copies the order shown does not survive it."""
    orders = candidate_orders(ITEMS, 5, 0, 3)
    by_content = [sorted(order, reverse=True) for order in orders]
    assert borda(by_content, ITEMS) == sorted(ITEMS, reverse=True)
    assert borda(orders, ITEMS) != ITEMS  # copying each order shown: the pre-rank order is diluted by the shuffles
