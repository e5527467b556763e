"""SID-constrained beam search: the vectorised trie constraint, the HF back-end against exhaustive scoring, and
the vLLM back-end against HF (vLLM runs in a subprocess: its in-process engine pins the process to one core)."""

from __future__ import annotations

import copy

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from beam_fixtures import assert_same_top_n, load_encoder, load_pre_ranker

from rec.beam import SidDecoding, SidTrieLogitsProcessor, hf_beam_search, top_items
from rec.midtrain_data import next_item_prompt_ids
from rec.sid.trie import SidTrie


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(run_dir, tokenizer, model, decoding, encoder, test rows) of a random tiny pre-ranker on 60 Beauty users."""
    run_dir, tokenizer, model, decoding = load_pre_ranker(tmp_path_factory.mktemp("beam") / "run")
    rows = run_dir.read_parquet("data", "test.parquet").to_pylist()
    return run_dir, tokenizer, model, decoding, load_encoder(run_dir, tokenizer), rows


def _small_decoding() -> SidDecoding:
    codes = np.array([[0, 1, 0], [0, 1, 1], [0, 2, 0], [3, 0, 2], [3, 3, 3]])
    trie = SidTrie.build(codes, np.array([10, 11, 12, 13, 14]), codebook_size=4)
    return SidDecoding(trie, torch.arange(12).view(3, 4) + 20, sid_begin=5, vocab_size=40)


def test_walk_and_allowed_match_a_python_prefix_table():
    decoding = _small_decoding()
    codes = [[0, 1, 0], [0, 1, 1], [0, 2, 0], [3, 0, 2], [3, 3, 3]]
    table: dict[tuple[int, ...], set[int]] = {}
    for sid in codes:
        for level in range(3):
            table.setdefault(tuple(sid[:level]), set()).add(sid[level])
    prefixes = [(), (0,), (3,), (1,), (0, 1), (0, 2), (3, 3), (0, 3), (2, 1)]
    for level in range(3):
        rows = [p for p in prefixes if len(p) == level]
        generated = torch.tensor([[20 + 4 * lv + c for lv, c in enumerate(p)] for p in rows]).view(len(rows), level)
        allowed = decoding.allowed_codes(decoding.walk(generated), level)
        for prefix, row in zip(rows, allowed):
            assert set(torch.nonzero(row).flatten().tolist()) == table.get(prefix, set()), prefix
    # a code token of the wrong level is off the trie: code 0 at level 1 is token 24, not 20
    assert decoding.walk(torch.tensor([[20, 20]])).tolist() == [-1]


def test_processor_masks_everything_but_allowed_codes_and_excluded_leaves():
    decoding = _small_decoding()
    prompt_len = 2
    scores = torch.randn(3, 40)
    # beams after prompt: [0, 1] -> codes 0,1 allowed at level 2; [3, 3] -> code 3; [3, 0] -> code 2
    input_ids = torch.tensor([[7, 5, 20, 25], [7, 5, 23, 27], [7, 5, 23, 24]])
    excluded = decoding.excluded_leaves([[11], [99]])  # prompt 0 excludes item 11 = (0, 1, 1); 99 has no SID
    processor = SidTrieLogitsProcessor(decoding, prompt_len, num_beams=1, excluded_leaves=excluded[[0, 1, 1]])
    out = processor(input_ids, scores)
    finite = [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in out]
    assert finite == [[28], [31], [30]]
    assert out[0, 28] == scores[0, 28]


def test_top_items_are_distinct_sorted_and_drop_dead_beams():
    trie = _small_decoding().trie
    leaves = torch.tensor([trie.num_internal + 2, trie.num_internal + 0, trie.num_internal + 2, 0, trie.num_internal + 4])
    scores = torch.tensor([-1.0, -3.0, -1.5, -0.5, -1e9])
    assert top_items(trie, leaves, scores, top_n=10) == [(12, -1.0), (10, -3.0)]
    assert top_items(trie, leaves, scores, top_n=1) == [(12, -1.0)]


def _exhaustive_scores(model, decoding, prompt, excluded):
    """Log-probability of every catalogue SID after `prompt` by teacher forcing (the ground truth): over the full
    vocabulary, or over each level's codes for a `level` decoding."""
    leaf_items = decoding.trie.leaf_item_ids
    paths = torch.zeros(len(leaf_items), decoding.levels, dtype=torch.long)
    children = decoding.trie.children  # every leaf's codes, by walking the dense table level by level
    frontier = [(0, [])]
    for _ in range(decoding.levels):
        frontier = [(int(child), codes + [code]) for node, codes in frontier
                    for code, child in enumerate(children[node].tolist()) if child >= 0]
    for leaf, codes in frontier:
        paths[leaf - decoding.trie.num_internal] = torch.tensor(codes)
    tokens = decoding.code_token_ids[torch.arange(decoding.levels), paths]
    full = torch.cat([torch.tensor(decoding.prompt_ids(prompt)).expand(len(tokens), -1), tokens], dim=1)
    with torch.no_grad():
        logits = model(full).logits[:, -decoding.levels - 1:-1].float()
    if decoding.sid_softmax == "level":
        level_logprobs = torch.stack([torch.log_softmax(logits[:, level, decoding.code_token_ids[level]], dim=-1)
                                      for level in range(decoding.levels)], dim=1)
        scores = level_logprobs.gather(2, paths[:, :, None]).squeeze(2).sum(1)
        return {int(i): float(s) for i, s in zip(leaf_items, scores) if int(i) not in excluded}
    logprobs = torch.log_softmax(logits, dim=-1)
    scores = logprobs.gather(2, tokens[:, :, None]).squeeze(2).sum(1)
    return {int(i): float(s) for i, s in zip(leaf_items, scores) if int(i) not in excluded}


@pytest.mark.parametrize("sid_softmax", ["vocab", "level"])
def test_wide_beam_equals_exhaustive_top_n_and_exclusion_holds(tiny, sid_softmax):
    _, tokenizer, model, decoding, encoder, rows = tiny
    decoding = copy.copy(decoding)
    decoding.sid_softmax = sid_softmax
    # a beam as wide as the number of internal trie nodes never prunes a prefix before the last level
    num_beams = decoding.trie.num_internal
    rows = rows[:2]
    prompts = [next_item_prompt_ids(encoder, r["history"], 256) for r in rows]
    results = hf_beam_search(model, decoding, prompts, num_beams, 10, exclude=[r["history"] for r in rows],
                             pad_id=tokenizer.pad_token_id)
    for row, prompt, result in zip(rows, prompts, results):
        truth = _exhaustive_scores(model, decoding, prompt, set(row["history"]))
        best = sorted(truth.items(), key=lambda kv: -kv[1])[:10]
        assert [i for i, _ in result] == [i for i, _ in best]
        assert np.allclose([s for _, s in result], [s for _, s in best], atol=1e-4)


def test_beam_20_returns_valid_distinct_unexcluded_items_with_true_scores(tiny):
    _, tokenizer, model, decoding, encoder, rows = tiny
    rows = rows[:8]
    prompts = [next_item_prompt_ids(encoder, r["history"], 256) for r in rows]
    exclude = [r["history"] for r in rows]
    results = hf_beam_search(model, decoding, prompts, 20, 10, exclude=exclude, pad_id=tokenizer.pad_token_id)
    catalogue = set(decoding.leaf_of_item)
    for row, prompt, result in zip(rows, prompts, results):
        items = [i for i, _ in result]
        assert len(items) == 10 and len(set(items)) == 10 and set(items) <= catalogue
        assert not set(items) & set(row["history"])
        scores = [s for _, s in result]
        assert scores == sorted(scores, reverse=True)
    for prompt, result in list(zip(prompts, results))[:3]:  # padding in the batch changes no score
        truth = _exhaustive_scores(model, decoding, prompt, set())
        assert np.allclose([s for _, s in result], [truth[i] for i, _ in result], atol=1e-4)


def test_vllm_back_end_returns_the_hf_top_n(tiny):
    run_dir, tokenizer, model, decoding, encoder, rows = tiny
    rows = rows[:12]
    prompts = [next_item_prompt_ids(encoder, r["history"], 256) for r in rows]
    exclude = [r["history"] if i % 2 == 0 else [] for i, r in enumerate(rows)]
    level = copy.copy(decoding)
    level.sid_softmax = "level"
    expected = {mode: hf_beam_search(model, d, prompts, 20, 10, exclude=exclude, pad_id=tokenizer.pad_token_id)
                for mode, d in (("vocab", decoding), ("level", level))}
    assert expected["vocab"] != expected["level"]  # the two normalisations give different scores
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from transformers import AutoTokenizer
        from rec.beam import SidDecoding
        from rec.engines.sid_ranker import VllmSidBeamSearch
        from rec.engines.vllm_runtime import start_llm
        from rec.io import RunDir
        run_dir = RunDir.open({run_dir.root!r})
        path = run_dir.local_path("models", "midtrain")
        sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
        llm = start_llm(path, max_model_len=320, kv_cache_memory_bytes=64 * 2**20, cpu_cores="0")
        for sid_softmax in ("vocab", "level"):
            decoding = SidDecoding.from_sid_map(AutoTokenizer.from_pretrained(path), sid_map["item_id"],
                                                np.array(sid_map["codes"]), 16, sid_softmax)
            found = VllmSidBeamSearch(llm, decoding, num_beams=20, top_n=10).search({prompts!r}, {exclude!r})
            print("RESULT", json.dumps(found))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True,
                          timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 2, done.stderr[-3000:]
    for mode, line in zip(("vocab", "level"), lines):
        found = json.loads(line[len("RESULT "):])
        for hf_result, vllm_result, excluded in zip(expected[mode], found, exclude):
            assert len(hf_result) == 10 and not {i for i, _ in vllm_result} & set(excluded)
            assert_same_top_n(hf_result, [tuple(pair) for pair in vllm_result])
