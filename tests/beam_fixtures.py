"""A tiny pre-ranker for the beam-search and prerank tests: a run dir slice, a tokenizer and a random tiny Qwen3.

The model is randomly initialised, with its embedding rescaled so that log-probabilities differ by far more than
float noise (a default init scores every SID nearly alike, and the HF-vs-vLLM comparison would compare ties).
It is saved like `pipelines/midtrain.py` publishes one: `<run_dir>/models/midtrain/` with the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from midtrain_fixtures import CODEBOOK_SIZE, make_run_dir

from rec.io import RunDir
from rec.midtrain_data import SidEncoder, tokenizer_corpus
from rec.model import ModelSection, build_tiny_model, configure_special_ids, train_tokenizer

TINY_DIMS = ModelSection(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                         intermediate_size=128, max_position_embeddings=1024)


def make_prerank_run_dir(root: Path, max_users: int = 60, seed: int = 0) -> RunDir:
    """A run dir with data/, sid/ and models/midtrain/ (random weights) for `max_users` Beauty users."""
    run_dir = make_run_dir(root, max_users=max_users, seed=seed)
    items = run_dir.read_parquet("data", "items.parquet").to_pydict()
    sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
    levels = len(sid_map["codes"][0])
    tokenizer = train_tokenizer(tokenizer_corpus(items["text"]), 400, levels, CODEBOOK_SIZE)
    model = build_tiny_model(TINY_DIMS, len(tokenizer), seed=seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        embedding = model.get_input_embeddings().weight
        embedding.copy_(torch.randn(embedding.shape, generator=generator))
    configure_special_ids(tokenizer, model)
    path = run_dir.local_path("models", "midtrain")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return run_dir


def load_pre_ranker(root: Path, max_users: int = 60):
    """(run_dir, tokenizer, model, decoding) of `make_prerank_run_dir`'s random tiny pre-ranker, loaded back as the
    stages load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rec.beam import SidDecoding

    run_dir = make_prerank_run_dir(root, max_users=max_users)
    path = run_dir.local_path("models", "midtrain")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
    decoding = SidDecoding.from_sid_map(tokenizer, sid_map["item_id"], np.array(sid_map["codes"]), CODEBOOK_SIZE)
    return run_dir, tokenizer, model, decoding


def load_encoder(run_dir: RunDir, tokenizer) -> SidEncoder:
    sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
    return SidEncoder(tokenizer, sid_map["item_id"], np.array(sid_map["codes"]), CODEBOOK_SIZE)


def assert_same_top_n(expected: list[tuple[int, float]], found: list[tuple[int, float]], tol: float = 1e-4) -> None:
    """Same items in the same order with the same scores, except that items tied within `tol` may swap."""
    assert len(found) == len(expected), (expected, found)
    for (item, score), (found_item, found_score) in zip(expected, found):
        assert abs(score - found_score) < tol, (expected, found)
        if item != found_item:
            tied = {i for i, s in expected if abs(s - score) < tol}
            assert found_item in tied, (expected, found)
