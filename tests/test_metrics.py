"""Ranking metrics against hand-computed values."""

import math

import numpy as np
import pytest

from rec.metrics import mrr, ndcg_at_k, ranking_metrics, recall_at_k, target_ranks


def test_target_ranks_finds_positions_and_misses():
    ranked = np.array([[4, 5, 6], [7, 8, 9], [1, 2, 3]])
    assert target_ranks(ranked, np.array([6, 7, 42])).tolist() == [2, 0, -1]


def test_hand_computed_values():
    ranks = np.array([0, 2, 4, -1])  # hits at positions 1, 3, 5 and one miss
    assert recall_at_k(ranks, 1) == 0.25
    assert recall_at_k(ranks, 3) == 0.5
    assert recall_at_k(ranks, 5) == 0.75
    assert ndcg_at_k(ranks, 3) == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert ndcg_at_k(ranks, 5) == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(6)) / 4)
    assert mrr(ranks) == pytest.approx((1 + 1 / 3 + 1 / 5) / 4)
    assert mrr(ranks, k=3) == pytest.approx((1 + 1 / 3) / 4)


def test_ranking_metrics_dict_and_bad_input():
    out = ranking_metrics(np.array([0, 1]), ks=(1, 2))
    assert out == {"recall@1": 0.5, "ndcg@1": 0.5, "recall@2": 1.0,
                   "ndcg@2": pytest.approx((1 + 1 / math.log2(3)) / 2), "mrr": 0.75, "users": 2}
    with pytest.raises(ValueError):
        recall_at_k(np.array([]), 5)
    with pytest.raises(ValueError):
        ndcg_at_k(np.array([0]), 0)
