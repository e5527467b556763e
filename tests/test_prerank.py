"""The prerank stage: which rows it builds, the Ray Data pool of vLLM engines end to end, resuming and skipping."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from beam_fixtures import assert_same_top_n, load_encoder, make_prerank_run_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.common import REPO_ROOT, StageOutputsMismatch
from pipelines.prerank import (
    CANDIDATES_SCHEMA,
    PrerankConfig,
    _parts,
    build_rows,
    run,
    split_fingerprints,
)
from rec.beam import SidDecoding, hf_beam_search
from rec.config import ConfigError, load_config
from rec.data import leave_one_out
from rec.midtrain_data import next_item_prompt_ids

TINY_YAML = REPO_ROOT / "pipelines" / "configs" / "tiny" / "prerank.yaml"
METRIC_KEYS = {"users", "recall@5", "recall@10", "ndcg@5", "ndcg@10", "target_in_candidates",
               "target_in_candidates_train"}


def _config(run_dir, *overrides: str) -> PrerankConfig:
    return load_config(PrerankConfig, TINY_YAML, [f"run_dir={run_dir}", "engine.max_model_len=256", *overrides])


def test_tiny_config_loads_and_checks_top_n():
    cfg = load_config(PrerankConfig, TINY_YAML, ["run_dir=runs/x"])
    assert (cfg.num_beams, cfg.top_n, cfg.actors, cfg.backend) == (20, 10, 2, "torch")
    with pytest.raises(ConfigError, match="top_n"):
        load_config(PrerankConfig, TINY_YAML, ["run_dir=runs/x", "top_n=30"])


def test_rows_use_prefixes_without_the_test_target():
    # user 1: train [1, 2, 3, 4], valid 5, test 6; user 2 bought 9 twice: its test target is also in its history
    splits = leave_one_out([(1, [1, 2, 3, 4, 5, 6]), (2, [7, 9, 8, 9]), (3, [11, 12, 13, 14])])
    cfg = PrerankConfig(run_dir="x", train_prefixes_per_user=2)
    rows = build_rows(splits["train"], splits["valid"], splits["test"], cfg)
    train = rows["train"].to_pylist()
    assert [(r["user_id"], r["history"], r["target"]) for r in train] == [
        (1, [1, 2, 3], 4), (1, [1, 2, 3, 4], 5), (3, [11], 12), (3, [11, 12], 13)]
    assert [r["row_id"] for r in train] == [0, 1, 2, 3]
    assert rows["test"].to_pylist()[0]["history"] == [1, 2, 3, 4, 5]
    every = PrerankConfig(run_dir="x", train_prefixes_per_user=None, train_include_valid=False, min_history=2,
                          max_users={"train": 1, "valid": 2, "test": 1})
    rows = build_rows(splits["train"], splits["valid"], splits["test"], every)
    assert [(r["history"], r["target"]) for r in rows["train"].to_pylist()] == [([1, 2], 3), ([1, 2, 3], 4)]
    assert (rows["valid"].num_rows, rows["test"].num_rows) == (2, 1)


def _fake_part(split: str, row_ids: list[int], candidates: list[list[int]]) -> pa.Table:
    return pa.table({
        "row_id": pa.array(row_ids, pa.int64()), "split": pa.array([split] * len(row_ids)),
        "candidates": pa.array(candidates, pa.list_(pa.int64())),
        "scores": pa.array([[-1.0] * len(c) for c in candidates], pa.list_(pa.float32())),
    })


@pytest.fixture
def prerank_run_dir(tmp_path):
    return make_prerank_run_dir(tmp_path / "run", max_users=24)


def test_resume_from_parts_then_skip_then_refuse_another_config(prerank_run_dir):
    """Results already in candidates/_parts are not recomputed (here: all of them, so no engine is needed)."""
    run_dir = prerank_run_dir
    cfg = _config(run_dir.root, "max_users.train=3", "max_users.valid=2", "max_users.test=4")
    fingerprints = split_fingerprints(cfg, run_dir.local_path("models", "midtrain"), run_dir)
    rows = build_rows(*(run_dir.read_parquet("data", f"{s}.parquet") for s in ("train", "valid", "test")), cfg)
    for split, table in rows.items():
        ids = table.column("row_id").to_pylist()
        for half in (ids[: len(ids) // 2], ids[len(ids) // 2:]):
            part = _fake_part(split, half, [[row_id, 100 + row_id] for row_id in half])
            _parts(run_dir, split, fingerprints[split]).write(part)
    metrics = run(cfg)
    test = run_dir.read_parquet("candidates", "test.parquet").to_pylist()
    assert [r["candidates"] for r in test] == [[i, 100 + i] for i in range(4)]
    assert [r["target"] for r in test] == rows["test"].column("target").to_pylist()
    assert METRIC_KEYS <= set(metrics) and metrics["users"] == 4 and metrics["rows"]["train"] == rows["train"].num_rows
    assert not run_dir.exists("candidates", "_parts")
    assert run(cfg)["recall@10"] == metrics["recall@10"]  # everything written: a rerun only recomputes metrics
    with pytest.raises(StageOutputsMismatch, match="num_beams"):
        run(_config(run_dir.root, "max_users.train=3", "max_users.valid=2", "max_users.test=4", "num_beams=10"))


@pytest.mark.slow
def test_vllm_actor_pool_end_to_end_matches_hf(prerank_run_dir):
    import ray

    run_dir = prerank_run_dir
    cfg = _config(run_dir.root, "backend=vllm", "max_users.train=8", "max_users.valid=4", "max_users.test=12",
                  "batch_size=8", "flush_rows=8", "num_cpus=3")
    fingerprints = split_fingerprints(cfg, run_dir.local_path("models", "midtrain"), run_dir)
    # rows 0-1 of the test split were finished by an earlier, interrupted run
    _parts(run_dir, "test", fingerprints["test"]).write(_fake_part("test", [0, 1], [[-7], [-8]]))
    try:
        metrics = run(cfg)
    finally:
        ray.shutdown()
    assert METRIC_KEYS <= set(metrics) and metrics["users"] == 12
    path = run_dir.local_path("models", "midtrain")
    tokenizer = AutoTokenizer.from_pretrained(path)
    sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
    catalogue = set(sid_map["item_id"])
    tables = {}
    for split in ("train", "valid", "test"):
        table = run_dir.read_parquet("candidates", f"{split}.parquet")
        assert table.schema.remove_metadata() == CANDIDATES_SCHEMA
        tables[split] = table.to_pylist()
    test = tables["test"]
    assert [r["candidates"] for r in test[:2]] == [[-7], [-8]]  # kept, not recomputed
    for row in [r for rows in tables.values() for r in rows if r["candidates"][0] >= 0]:
        assert len(row["candidates"]) == 10 and len(set(row["candidates"])) == 10
        assert set(row["candidates"]) <= catalogue and not set(row["candidates"]) & set(row["history"])
        assert row["scores"] == sorted(row["scores"], reverse=True)
    # the engines' answers are the HF reference's on the same prompts
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    decoding = SidDecoding.from_sid_map(tokenizer, sid_map["item_id"], np.array(sid_map["codes"]), 16)
    encoder = load_encoder(run_dir, tokenizer)
    rows = test[2:6]
    expected = hf_beam_search(model, decoding, [next_item_prompt_ids(encoder, r["history"], 256) for r in rows], 20,
                              10, exclude=[r["history"] for r in rows], pad_id=tokenizer.pad_token_id)
    for row, want in zip(rows, expected):
        assert_same_top_n(want, list(zip(row["candidates"], row["scores"])))


def test_actor_with_the_hf_back_end_builds_prompts_and_excludes_history(prerank_run_dir):
    """The Ray Data actor class called directly (no Ray): the HF reference back-end, same output contract."""
    from pipelines.prerank import PrerankBatch

    run_dir = prerank_run_dir
    cfg = _config(run_dir.root, "backend=hf", "num_beams=12", "top_n=5")
    actor = PrerankBatch(run_dir.root, run_dir.local_path("models", "midtrain"), 16, cfg.model_dump(mode="json"))
    test = build_rows(*(run_dir.read_parquet("data", f"{s}.parquet") for s in ("train", "valid", "test")), cfg)["test"]
    batch = test.slice(0, 6).select(["row_id", "history"]).append_column("split", pa.array(["test"] * 6))
    out = actor(batch).to_pylist()
    assert [r["row_id"] for r in out] == list(range(6)) and {r["split"] for r in out} == {"test"}
    catalogue = set(run_dir.read_parquet("sid", "sid_map.parquet").column("item_id").to_pylist())
    for row, history in zip(out, batch.column("history").to_pylist()):
        assert len(row["candidates"]) == 5 == len(set(row["candidates"])) and set(row["candidates"]) <= catalogue
        assert not set(row["candidates"]) & set(history)


def test_actor_with_the_torch_back_end_returns_the_hf_reference(prerank_run_dir):
    """The default back-end (batched torch search, one prefill per user) through the stage's actor class: the same
    candidates and scores as the HF reference back-end on the same rows."""
    from pipelines.prerank import PrerankBatch

    run_dir = prerank_run_dir
    answers = {}
    for backend in ("torch", "hf"):
        cfg = _config(run_dir.root, f"backend={backend}", "num_beams=12", "top_n=5")
        actor = PrerankBatch(run_dir.root, run_dir.local_path("models", "midtrain"), 16, cfg.model_dump(mode="json"))
        test = build_rows(*(run_dir.read_parquet("data", f"{s}.parquet") for s in ("train", "valid", "test")),
                          cfg)["test"]
        batch = test.slice(0, 8).select(["row_id", "history"]).append_column("split", pa.array(["test"] * 8))
        answers[backend] = actor(batch).to_pylist()
    for torch_row, hf_row in zip(answers["torch"], answers["hf"]):
        assert_same_top_n(list(zip(hf_row["candidates"], hf_row["scores"])),
                          list(zip(torch_row["candidates"], torch_row["scores"])))


def test_a_new_user_slice_redoes_only_that_split(tmp_path):
    import json

    from pipelines.prerank import META_KEY, splits_to_do
    from rec.io import RunDir

    run_dir = RunDir.open(str(tmp_path))
    done = {"num_beams": 20, "max_users": 0}
    for split in ("train", "valid", "test"):
        table = CANDIDATES_SCHEMA.empty_table().replace_schema_metadata({META_KEY: json.dumps(done).encode()})
        run_dir.write_parquet(table, "candidates", f"{split}.parquet")
    wanted = {"train": {"num_beams": 20, "max_users": 6000}, "valid": dict(done), "test": dict(done)}
    assert splits_to_do(run_dir, wanted, overwrite=False) == ["train"]
    with pytest.raises(StageOutputsMismatch, match="num_beams"):
        splits_to_do(run_dir, {**wanted, "test": {"num_beams": 10, "max_users": 0}}, overwrite=False)
