"""`rec.beam_torch.torch_beam_search` against the HF reference `rec.beam.hf_beam_search`: same top-N and scores on
the tiny fixture (padding, exclusion, beams narrower and wider than the first trie level, dead beams, ties) and on
real Beauty histories over all 12,101 items with a model of the tiny_full preset's size."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from beam_fixtures import assert_same_top_n, load_encoder, load_pre_ranker

from rec.beam import SidDecoding, hf_beam_search
from rec.beam_torch import prefill_groups, torch_beam_search
from rec.midtrain_data import next_item_prompt_ids

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, model, decoding, prompts, histories) of a random tiny pre-ranker on 60 Beauty users."""
    run_dir, tokenizer, model, decoding = load_pre_ranker(tmp_path_factory.mktemp("beam_torch") / "run")
    histories = run_dir.read_parquet("data", "test.parquet").column("history").to_pylist()[:12]
    encoder = load_encoder(run_dir, tokenizer)
    prompts = [next_item_prompt_ids(encoder, h, 256) for h in histories]
    return tokenizer, model, decoding, prompts, histories


def assert_same_results(expected, found):
    assert len(found) == len(expected)
    for hf_row, torch_row in zip(expected, found):
        assert_same_top_n(hf_row, torch_row)


def max_score_diff(expected, found) -> float:
    return max(abs(a - b) for x, y in zip(expected, found) for (_, a), (_, b) in zip(x, y))


@pytest.mark.parametrize("num_beams", [5, 20], ids=["beams_below_first_level", "beams_above_first_level"])
@pytest.mark.parametrize("with_exclusion", [False, True])
def test_same_top_n_and_scores_as_hf(tiny, num_beams, with_exclusion):
    tokenizer, model, decoding, prompts, histories = tiny
    first_level = int((decoding.trie.children[0] >= 0).sum())  # 16 codes: 5 beams prune there, 20 do not fill up
    assert (num_beams < first_level) == (num_beams == 5)
    lengths = sorted((len(p) for p in prompts), reverse=True)
    assert len(set(lengths)) > 1 and len(prefill_groups(lengths)) > 1  # padding, and several prefill groups
    exclude = histories if with_exclusion else None
    top_n = min(10, num_beams)
    expected = hf_beam_search(model, decoding, prompts, num_beams, top_n, exclude=exclude,
                              pad_id=tokenizer.pad_token_id)
    found = torch_beam_search(model, decoding, prompts, num_beams, top_n, exclude=exclude,
                              pad_id=tokenizer.pad_token_id)
    assert_same_results(expected, found)
    assert all(len(row) == top_n for row in found)
    if with_exclusion:
        assert all(not {item for item, _ in row} & set(h) for row, h in zip(found, histories))


def test_level_sid_softmax_same_top_n_and_scores_as_hf(tiny):
    tokenizer, model, decoding, prompts, histories = tiny
    level = copy.copy(decoding)
    level.sid_softmax = "level"
    expected = hf_beam_search(model, level, prompts, 20, 10, exclude=histories, pad_id=tokenizer.pad_token_id)
    found = torch_beam_search(model, level, prompts, 20, 10, exclude=histories, pad_id=tokenizer.pad_token_id)
    assert_same_results(expected, found)
    vocab = torch_beam_search(model, decoding, prompts, 20, 10, exclude=histories, pad_id=tokenizer.pad_token_id)
    # per-level scores are higher (each level's codes share all of the probability): a different search
    assert all(a[0][1] > b[0][1] for a, b in zip(found, vocab))


def test_dead_beams_get_no_item(tiny):
    """Beams without a valid child die; a prompt with fewer reachable items than beams returns only those."""
    tokenizer, model, decoding, prompts, _ = tiny
    prompts = prompts[:4]
    best = hf_beam_search(model, decoding, prompts, 20, 10, pad_id=tokenizer.pad_token_id)
    sids = _item_codes(decoding)
    # keep only the items under each prompt's best 2-code prefix, which the beam reaches (exclusion applies at the
    # last level only, so the first two levels run as without it)
    exclude = []
    for row in best:
        prefix = sids[row[0][0]][:2]
        exclude.append([item for item, codes in sids.items() if codes[:2] != prefix])
    expected = hf_beam_search(model, decoding, prompts, 20, 10, exclude=exclude, pad_id=tokenizer.pad_token_id)
    found = torch_beam_search(model, decoding, prompts, 20, 10, exclude=exclude, pad_id=tokenizer.pad_token_id)
    assert all(0 < len(row) < 10 for row in found)
    assert_same_results(expected, found)
    assert all(math.isfinite(score) for row in found for _, score in row)
    # nothing reachable at all: HF's generate cannot return then; the torch search returns empty lists
    everything = [list(decoding.leaf_of_item)] * len(prompts)
    assert torch_beam_search(model, decoding, prompts, 20, 10, exclude=everything,
                             pad_id=tokenizer.pad_token_id) == [[] for _ in prompts]


def _item_codes(decoding: SidDecoding) -> dict[int, tuple[int, ...]]:
    """Every catalogue item's codes, by walking the dense trie table."""
    frontier = [(0, ())]
    for _ in range(decoding.levels):
        frontier = [(int(child), (*codes, code)) for node, codes in frontier
                    for code, child in enumerate(decoding.trie.children[node].tolist()) if child >= 0]
    leaf_items = decoding.trie.leaf_item_ids.tolist()
    return {leaf_items[leaf - decoding.trie.num_internal]: codes for leaf, codes in frontier}


def test_ties_go_to_the_smallest_sids(tiny):
    """All logits equal: every SID ties. The torch search keeps (parent rank, code) order, i.e. the smallest SIDs;
    HF returns tied items in torch.topk's arbitrary order, with the same scores."""
    tokenizer, model, decoding, prompts, histories = tiny
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.get_input_embeddings().weight.zero_()
        flat.get_output_embeddings().weight.zero_()
    tie = -decoding.levels * math.log(flat.config.vocab_size)
    codes = _item_codes(decoding)
    expected = hf_beam_search(flat, decoding, prompts[:3], 20, 10, exclude=histories[:3],
                              pad_id=tokenizer.pad_token_id)
    found = torch_beam_search(flat, decoding, prompts[:3], 20, 10, exclude=histories[:3],
                              pad_id=tokenizer.pad_token_id)
    for hf_row, torch_row, history in zip(expected, found, histories[:3]):
        smallest = sorted((c, item) for item, c in codes.items() if item not in set(history))[:10]
        assert [item for item, _ in torch_row] == [item for _, item in smallest]
        assert np.allclose([s for _, s in torch_row], tie, atol=1e-4)
        assert np.allclose([s for _, s in hf_row], tie, atol=1e-4)


@pytest.fixture(scope="module")
def beauty():
    """(tokenizer, model, decoding, prompts, histories): every Beauty item with random 3 x 256 codes + the
    disambiguation level, real test histories, a random model of the tiny_full preset's dims (its embedding
    rescaled as in beam_fixtures, so that SIDs do not nearly tie, but to std 0.25: with std 1 the scores are ~-450,
    where float32 spacing is 3e-5 and two correct summation orders already differ by ~1e-4; here ~-110)."""
    from rec.data import leave_one_out, load_items, load_sequences
    from rec.midtrain_data import SidEncoder, tokenizer_corpus
    from rec.model import ModelSection, build_tiny_model, configure_special_ids, train_tokenizer
    from rec.sid.quantize import disambiguate

    dims = ModelSection(**yaml.safe_load((REPO / "pipelines/configs/tiny_full/midtrain.yaml").read_text())["model"])
    dataset = REPO / "data" / "amazon_beauty_2014_5core"
    items = load_items(dataset / "items.jsonl")
    item_ids = items.column("item_id").to_pylist()
    sequences = load_sequences(dataset / "sequences.jsonl", set(item_ids), set())
    histories = leave_one_out(sequences)["test"].column("history").to_pylist()
    codebook = 256
    codes = disambiguate(np.random.default_rng(0).integers(0, codebook, size=(len(item_ids), 3)), codebook, 0)
    tokenizer = train_tokenizer(tokenizer_corpus(items.column("text").to_pylist()), dims.tokenizer_vocab_size,
                                codes.shape[1], codebook)
    model = build_tiny_model(dims, len(tokenizer), seed=0).eval()
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.copy_(0.25 * torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0)))
    configure_special_ids(tokenizer, model)
    decoding = SidDecoding.from_sid_map(tokenizer, item_ids, codes, codebook)
    encoder = SidEncoder(tokenizer, item_ids, codes, codebook)
    rows = np.random.default_rng(1).choice(len(histories), 256, replace=False)
    histories = [histories[row] for row in rows]
    return tokenizer, model, decoding, [next_item_prompt_ids(encoder, h, 256) for h in histories], histories


def _beauty_parity(beauty, users: int) -> None:
    tokenizer, model, decoding, prompts, histories = beauty
    assert len(decoding.leaf_of_item) == 12101
    prompts, histories = prompts[:users], histories[:users]
    exclude = [h if row % 2 == 0 else [] for row, h in enumerate(histories)]
    expected = []
    for start in range(0, users, 64):  # HF runs 20 copies of every prompt: batches of 64 as the benchmark does
        expected += hf_beam_search(model, decoding, prompts[start:start + 64], 20, 10,
                                   exclude=exclude[start:start + 64], pad_id=tokenizer.pad_token_id)
    found = torch_beam_search(model, decoding, prompts, 20, 10, exclude=exclude, pad_id=tokenizer.pad_token_id)
    assert_same_results(expected, found)
    assert all(len(row) == 10 for row in found)
    assert max_score_diff(expected, found) < 1e-4


def test_real_beauty_histories_32_users(beauty):
    _beauty_parity(beauty, 32)


@pytest.mark.slow
def test_real_beauty_histories_256_users(beauty):
    _beauty_parity(beauty, 256)
