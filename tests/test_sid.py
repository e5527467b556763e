"""SID strings, the tensor trie, quantisation and the random last level, the SID report, long-text embedding, and
the sid stage on a generated catalogue of 30 items with `codebook_size: 256`."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from catalogue_fixture import write_catalogue
from conftest import REPO_ROOT
from rec.sid import SidParseError, SidTrie, disambiguate, find_sids, parse_sid, render_sid, sid_report
from rec.sid.quantize import balanced_assign, entropy_bits, fit_codebook_size, fit_rq_kmeans, kmeans


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


def test_sid_report_spread_collisions_and_duplicate_titles():
    codes_before = np.array([[0, 0], [0, 0], [0, 1], [1, 2], [2, 3], [0, 0]])
    full = disambiguate(codes_before, codebook_size=4, seed=0)
    titles = ["USB Cable 2 m", "usb cable  2 m", "USB Cable 2 m", "Hub", "Hub", None]
    report = sid_report(codes_before, full, 4, titles=titles, item_ids=[10, 11, 12, 13, 14, 15])
    assert report["entropy_max_bits"] == 2.0
    assert report["entropy_bits_per_level"][0] == round(entropy_bits(codes_before[:, 0]), 4) < 2.0
    assert report["largest_code_share_per_level"][:2] == [round(4 / 6, 4), 0.5]
    assert report["collision_groups"] == 1 and report["items_in_collision_groups"] == 3
    assert report["max_collision_group"] == 3
    titles_report = report["duplicate_titles"]
    assert titles_report["titles_shared"] == 2 and titles_report["items"] == 5
    assert titles_report["groups_with_same_codes"] == 0  # item 12 differs on level b; the hubs on both levels
    assert titles_report["examples"][0] == {"title": "USB Cable 2 m", "items": 3, "item_ids": [10, 11, 12],
                                            "same_codes": False}


def test_kmeans_on_fewer_distinct_points_than_codes_leaves_codes_unused():
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(5, 8)), 3, axis=0).astype(np.float32)  # 15 points, 5 distinct
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning about duplicate points either
        centroids, labels = kmeans(x, 8, seed=0)
    assert centroids.shape == (8, 8) and len(np.unique(labels)) == 5 and labels.max() < 5
    assert np.allclose(centroids[labels], x, atol=1e-5)


def test_a_catalogue_smaller_than_the_codebook_is_sized_down():
    assert fit_codebook_size(256, 12101) == 256 and fit_codebook_size(256, 30) == 30
    x = np.random.default_rng(1).normal(size=(30, 16)).astype(np.float32)
    size = fit_codebook_size(256, len(x))
    codes = disambiguate(fit_rq_kmeans(x, levels=3, codebook_size=size, seed=0), size, seed=0)
    trie = SidTrie.build(codes, np.arange(30), codebook_size=size)  # what prerank builds from the report's size
    assert codes.max() < size and trie.children.shape[1] == size
    # unsized, k-means fits one code per item it can tell apart (it used to raise: 256 clusters on 30 points)
    assert fit_rq_kmeans(x, levels=1, codebook_size=256, seed=0).max() < 30


def test_balanced_assign_caps_codes_and_otherwise_takes_the_nearest():
    rng = np.random.default_rng(0)
    distances = rng.random((200, 8)) + np.linspace(0, 1, 8)[None, :] * 0.5  # code 0 is nearest for most points
    capped = balanced_assign(distances, capacity=30)
    assert np.bincount(capped, minlength=8).max() <= 30 and (capped >= 0).all()
    assert np.array_equal(balanced_assign(distances, capacity=200), distances.argmin(axis=1))
    with pytest.raises(ValueError, match="cannot hold"):
        balanced_assign(distances, capacity=10)


def test_balance_spreads_a_skewed_residual_level():
    # one dense blob holding most items plus a scattered tail: plain k-means gives the blob's centre a big code
    rng = np.random.default_rng(0)
    x = np.concatenate([0.05 * rng.normal(size=(1500, 8)), rng.normal(size=(500, 8)) * 2]).astype(np.float32)
    plain = fit_rq_kmeans(x, levels=1, codebook_size=16, seed=0)[:, 0]
    balanced = fit_rq_kmeans(x, levels=1, codebook_size=16, seed=0, balance=1.5)[:, 0]
    assert np.bincount(balanced).max() <= np.ceil(2000 / 16 * 1.5) < np.bincount(plain).max()
    assert entropy_bits(balanced) > entropy_bits(plain) + 0.3
    assert np.array_equal(balanced, fit_rq_kmeans(x, levels=1, codebook_size=16, seed=0, balance=1.5)[:, 0])


# --- long texts and the encoder window (the bundled MiniLM encoder, no Ray) ------------------------------------


@pytest.fixture(scope="module")
def encoder():
    from rec.sid.embed import TextEncoder

    return TextEncoder(batch_size=16)


def _variant(encoder, **settings):
    """The same loaded encoder with other long-text settings."""
    other = copy.copy(encoder)
    other.__dict__.update(settings)
    return other


LIPSTICK = ("A creamy matte lipstick in deep rose with shea butter and vitamin E, long wearing and hydrating. " * 30)
SOLDERING = ("A digital soldering station with a ceramic heater, temperature control from 200 to 480 degrees C and "
             "an ESD-safe iron. " * 30)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_chunked_embedding_keeps_what_truncation_cuts(encoder):
    long_text = LIPSTICK + SOLDERING  # the lipstick part alone fills the 256-token window
    texts = ["Rose lipstick", long_text]
    chunked = encoder.encode(texts)
    truncated = _variant(encoder, long_text="truncate", max_chunks=1).encode(texts)
    room = encoder.window - encoder.specials
    assert chunked.tokens[1] == truncated.tokens[1] > 2 * room
    assert chunked.chunks.tolist() == [1, -(-int(chunked.tokens[1]) // room)] and chunked.tokens_lost.sum() == 0
    assert truncated.chunks.tolist() == [1, 1] and truncated.tokens_lost.tolist() == [0, chunked.tokens[1] - room]
    np.testing.assert_allclose(chunked.embeddings[0], truncated.embeddings[0], atol=1e-5)  # short: same path
    soldering = encoder([SOLDERING])[0]
    # the cut text is the lipstick text; the pooled one also carries the soldering half
    assert _cosine(truncated.embeddings[1], encoder([LIPSTICK])[0]) > 0.95
    assert _cosine(chunked.embeddings[1], soldering) > _cosine(truncated.embeddings[1], soldering) + 0.2
    assert np.allclose(np.linalg.norm(chunked.embeddings, axis=1), 1.0, atol=1e-5)


def test_chunks_beyond_max_chunks_are_counted_as_lost(encoder):
    out = _variant(encoder, max_chunks=2).encode([LIPSTICK * 3])
    room = encoder.window - encoder.specials
    assert out.chunks.tolist() == [2] and out.tokens_lost.tolist() == [out.tokens[0] - 2 * room]


# --- the stage on a generated catalogue ---------------------------------------------------------------------------


def test_sid_stage_on_30_items_with_codebook_256_sizes_down_and_reports(encoder, tmp_path, capsys, caplog):
    from pipelines.prepare import PrepareConfig
    from pipelines.prepare import run as run_prepare
    from pipelines.sid import SidConfig, embedding_key, main, write_embeddings
    from rec.io import RunDir

    dataset = write_catalogue(tmp_path / "catalogue", items=30, users=40, seed=0)
    facts = json.loads((dataset / "facts.json").read_text())
    run_dir = tmp_path / "run"
    run_prepare(PrepareConfig(run_dir=str(run_dir), dataset_dir=str(dataset)))
    # Embed here with the same encoder class the stage's Ray actors use (tests/test_stages.py runs that pool), so
    # the stage reuses these embeddings and this test needs no Ray.
    run = RunDir.open(str(run_dir))
    items = run.read_parquet("data", "items.parquet")
    cfg = SidConfig(run_dir=str(run_dir))
    assert cfg.codebook_size == 256
    write_embeddings(run, embedding_key(cfg.embed, items), items.column("item_id").to_numpy(),
                     encoder.encode(items.column("text").to_pylist()))

    config = str(REPO_ROOT / "pipelines" / "configs" / "tiny" / "sid.yaml")
    main(["--config", config, f"run_dir={run_dir}"])  # returns: no SystemExit, no traceback

    printed = capsys.readouterr().out
    report = json.loads((run_dir / "sid" / "report.json").read_text())
    assert report["seconds_embed"] == 0.0  # the embeddings above were reused
    assert report["codebook_size_configured"] == 256
    assert report["codebook_size_used"] == report["codebook_size"] == 30
    assert any("codebook_size=256" in w for w in report["warnings"])
    assert any("codebook_size=256" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "codebook_size 256 asked, 30 used" in printed and "entropy (max 4.91)" in printed
    sid_map = pq.read_table(run_dir / "sid" / "sid_map.parquet").to_pydict()
    codes = np.array(sid_map["codes"])
    assert len(set(sid_map["sid"])) == 30 and codes.max() < 30
    SidTrie.build(codes, np.array(sid_map["item_id"]), report["codebook_size"])  # what prerank and serving build
    assert sorted(sid_map["item_id"]) == list(range(30))  # 0-based ids kept
    window = report["encoder_window"]
    assert window["texts_over_window"] == window["texts_chunked"] == len(facts["long_description_item_ids"])
    assert window["truncated_examples"] == facts["very_long_item_ids"]  # longer than 8 windows
    assert window["texts_truncated"] == 1 and window["tokens_lost_total"] == window["tokens_lost_max"] > 0
    titles = report["duplicate_titles"]
    assert titles["titles_shared"] == len(facts["duplicate_title_groups"])
    assert titles["items"] == sum(map(len, facts["duplicate_title_groups"]))
    identical = facts["identical_item_groups"][0]
    assert {"items": 3, "item_ids": identical, "same_codes": True}.items() <= next(
        e for e in titles["examples"] if e["item_ids"] == identical).items()
    # a codebook too small for the largest collision group is a config error naming the setting (exit 2)
    with pytest.raises(SystemExit) as stop:
        main(["--config", config, f"run_dir={run_dir}", "codebook_size=2", "overwrite=true"])
    assert stop.value.code == 2 and "codebook_size=2" in capsys.readouterr().err
