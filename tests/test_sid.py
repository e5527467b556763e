"""SID strings, the tensor trie, quantisation and the random last level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rec.sid import SidParseError, SidTrie, disambiguate, find_sids, parse_sid, render_sid, sid_report
from rec.sid.quantize import fit_rq_kmeans


def test_render_parse_round_trip():
    for codes in [(0,), (12, 200, 7, 0), (255, 255, 255, 255)]:
        assert parse_sid(render_sid(codes)) == codes


@pytest.mark.parametrize(
    "bad",
    ["<|sid_begin|><s_b_1><|sid_end|>", "<|sid_begin|><s_a_1>x<s_b_2><|sid_end|>", "<s_a_1><s_b_2>",
     "<|sid_begin|><|sid_end|>", "<|sid_begin|><s_a_1><s_b_2>"],
)
def test_parse_rejects_malformed(bad):
    with pytest.raises(SidParseError):
        parse_sid(bad)


def test_find_sids_skips_malformed_fragments():
    text = "x <|sid_begin|><s_a_1><s_c_2><|sid_end|> y " + render_sid([3, 4]) + " " + render_sid([5, 6])
    assert find_sids(text) == [(3, 4), (5, 6)]


def _random_unique_codes(n: int, depth: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.unique(rng.integers(0, k, size=(n * 2, depth)), axis=0)
    return codes[rng.permutation(len(codes))[:n]]


def test_trie_walks_exactly_the_catalogue():
    codes = _random_unique_codes(300, depth=3, k=8, seed=0)
    item_ids = np.arange(1000, 1000 + len(codes))
    trie = SidTrie.build(codes, item_ids, codebook_size=8)
    # follow every SID through the trie: each step allowed, the leaf gives back the item
    nodes = torch.zeros(len(codes), dtype=torch.long)
    for level in range(3):
        step_codes = torch.from_numpy(codes[:, level])
        assert trie.allowed(nodes)[torch.arange(len(codes)), step_codes].all()
        nodes = trie.step(nodes, step_codes)
    assert torch.equal(trie.item_ids_of(nodes), torch.from_numpy(item_ids))
    # the allowed sets equal the set of observed prefixes, level by level
    root_allowed = set(np.flatnonzero(trie.allowed(torch.tensor([0]))[0].numpy()))
    assert root_allowed == set(codes[:, 0].tolist())
    # a code not in the catalogue leads nowhere
    missing = next(c for c in range(8) if c not in root_allowed) if len(root_allowed) < 8 else None
    if missing is not None:
        assert trie.step(torch.tensor([0]), torch.tensor([missing])).item() == -1


def test_trie_rejects_duplicate_sids():
    with pytest.raises(ValueError, match="share the SID"):
        SidTrie.build(np.array([[1, 2], [1, 2]]), np.array([5, 6]), codebook_size=4)


def test_disambiguate_makes_every_sid_unique_and_is_seeded():
    codes = np.array([[0, 0]] * 5 + [[1, 1]] * 3 + [[2, 2]])
    out = disambiguate(codes, codebook_size=8, seed=3)
    assert len(np.unique(out, axis=0)) == len(codes)
    assert np.array_equal(out[:, :2], codes)
    assert np.array_equal(out, disambiguate(codes, codebook_size=8, seed=3))
    with pytest.raises(ValueError, match="share one code tuple"):
        disambiguate(codes, codebook_size=4, seed=0)


def test_rq_kmeans_is_deterministic_and_report_is_consistent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    a = fit_rq_kmeans(x, levels=2, codebook_size=16, seed=0)
    b = fit_rq_kmeans(x, levels=2, codebook_size=16, seed=0)
    assert a.shape == (600, 2) and a.dtype == np.int64 and np.array_equal(a, b)
    full = disambiguate(a, codebook_size=16, seed=0)
    report = sid_report(a, full, 16)
    assert report["unique_fraction"] == 1.0
    assert report["levels"] == 3 and report["items"] == 600
    assert report["utilisation_per_level"][0] == 1.0  # k-means leaves no cluster empty here
    assert report["max_collision_group"] >= 1
