"""The traces stage: eligible rows, acceptance bookkeeping, stats, a real teacher actor on vLLM, and kill + resume."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from beam_fixtures import make_prerank_run_dir

from pipelines.common import REPO_ROOT, StageOutputsMismatch
from pipelines.traces import (
    ROWS_SCHEMA,
    RowState,
    TeacherBatch,
    TeacherStream,
    TracesConfig,
    compute_stats,
    eligible_rows,
    run,
)
from prerank_candidates import write_candidates
from stage_process import kill_when
from rec.config import ConfigError, load_config
from rec.rerank import ParseResult

TINY_YAML = REPO_ROOT / "pipelines" / "configs" / "tiny" / "traces.yaml"
# the fixture model reads 1024 positions and its 400-token vocabulary spends ~1 token per character
SMALL_PROMPTS = ["engine.max_model_len=1024", "prompt.history_token_budget=40", "prompt.max_title_chars=16",
                 "sampling.max_explanation_tokens=8"]


def _config(run_dir, *overrides: str) -> TracesConfig:
    return load_config(TracesConfig, TINY_YAML, [f"run_dir={run_dir}", *SMALL_PROMPTS, *overrides])


def test_config_checks_the_attempt_budget():
    assert _config("x").samples_in_round(6) == 2  # 8 attempts, 4 per round: the last round gets what is left
    assert _config("x", "mode=target").samples_in_round(0) == 1
    with pytest.raises(ConfigError, match="samples_per_round"):
        _config("x", "samples_per_round=9")


def test_eligible_rows_keep_lists_with_the_target_or_insert_it_where_the_seed_says():
    candidates = pa.table({
        "user_id": [1, 2, 3], "history": [[5], [6, 7], [8]], "target": [10, 20, 30],
        "candidates": [[11, 10, 12], [21, 22, 23], [31, 32, 33]], "scores": [[0.0] * 3] * 3,
    })
    rows, dropped = eligible_rows(candidates, TracesConfig(run_dir="x", insert_missing_target=False))
    assert rows.column("row_id").to_pylist() == [0] and dropped == {"rows_without_target": 2, "rows_target_inserted": 0}
    rows, dropped = eligible_rows(candidates, TracesConfig(run_dir="x", insert_missing_target=True))
    assert rows.column("target_inserted").to_pylist() == [False, True, True]
    for target, listed in zip(rows.column("target").to_pylist(), rows.column("candidates").to_pylist()):
        assert listed.count(target) == 1 and len(listed) == 3
    again, _ = eligible_rows(candidates, TracesConfig(run_dir="x", insert_missing_target=True))
    assert again.equals(rows)  # seeded
    assert eligible_rows(candidates, TracesConfig(run_dir="x", insert_missing_target=True, max_rows=2))[0].num_rows == 2


def test_the_first_accepted_sample_wins_and_invalid_ones_are_counted():
    row = RowState(0, "p", [1, 2], ["a", "b", "c"], [100, 200, 300], target_position=1)
    row.take("bad", ParseResult(valid=False, reason="truncated"), 1)
    assert row.completion == "bad" and row.reasons == {"truncated": 1}
    row.take("wrong", ParseResult(valid=True, ranking=[0, 1, 2]), 1)
    assert (row.completion, row.ranking, row.accepted_round) == ("wrong", [100, 200, 300], 0)
    row.take("bad again", ParseResult(valid=False, reason="duplicate"), 1)
    assert row.completion == "wrong"  # a valid answer is kept over a later invalid one
    row.take("right", ParseResult(valid=True, ranking=[1, 2, 0]), 2)
    row.take("also right", ParseResult(valid=True, ranking=[1, 0, 2]), 2)
    assert (row.completion, row.ranking, row.accepted_round) == ("right", [200, 300, 100], 2)


def test_stats_report_acceptance_by_round_and_cost_per_accepted_trace():
    n = 4
    table = pa.table({
        "accepted": [True, True, False, True], "attempts": [4, 8, 8, 4], "rounds": [1, 2, 2, 1],
        "accepted_round": [1, 2, 0, 1], "generated_tokens": [400, 800, 800, 400],
        "request_prompt_tokens": [100, 200, 200, 100], "valid": [True] * n,
        "invalid_reasons": ["{}", '{"truncated": 2}', "{}", "{}"],
    })
    stats = compute_stats(table, TracesConfig(run_dir="x"), {"rows_per_second": 1.0})
    assert stats["acceptance_rate"] == 0.75 and stats["accepted"] == 3 and stats["rows"] == n
    assert stats["acceptance_by_round"] == {"1": {"rows": 4, "accepted": 2, "rate": 0.5},
                                            "2": {"rows": 2, "accepted": 1, "rate": 0.5}}
    assert stats["attempts_mean"] == 6.0 and stats["attempts_p90"] == 8.0
    assert stats["generated_tokens_per_accepted"] == 800.0 and stats["prompt_tokens_per_accepted"] == 200.0
    assert stats["invalid_reasons"] == {"truncated": 2} and stats["invalid_rate"] == 2 / 24


@pytest.fixture(scope="module")
def traces_run_dir(tmp_path_factory):
    run_dir = make_prerank_run_dir(tmp_path_factory.mktemp("traces") / "run", max_users=40)
    write_candidates(run_dir, rows=24, seed=0)
    return run_dir


@pytest.mark.parametrize("backend", ["vllm", "hf", "vllm-continuous"])
def test_teacher_writes_parsed_rankings_within_the_budget(traces_run_dir, backend):
    """One real teacher actor over 6 rows, no Ray: an in-process vLLM engine with the ranking logits processor, the
    HF generate loop with the same constraint, or (continuous) vLLM's async engine in its child process, every row
    running its own rounds."""
    run_dir = traces_run_dir
    continuous = backend == "vllm-continuous"
    cfg = _config(run_dir.root, "samples_per_round=2", "max_attempts=4", "bind_cores=false",
                  f"backend={backend.split('-')[0]}", f"continuous={str(continuous).lower()}")
    rows, _ = eligible_rows(run_dir.read_parquet("candidates", "train.parquet"), cfg)
    batch = rows.slice(0, 6).select(["row_id", "history", "candidates", "target"])
    args = (str(run_dir.root), run_dir.local_path("models", "midtrain"), cfg.model_dump(mode="json"))
    if continuous:
        import asyncio

        teacher = TeacherStream(*args)
        try:
            out = asyncio.run(teacher(batch)).to_pylist()
        finally:
            teacher.reranker.shutdown()
    else:
        out = TeacherBatch(*args)(batch).to_pylist()
    assert [r["row_id"] for r in out] == batch.column("row_id").to_pylist()
    for result, target, listed in zip(out, batch.column("target").to_pylist(), batch.column("candidates").to_pylist()):
        assert result["valid"] and result["invalid_samples"] == 0  # constrained: every sample parses
        assert sorted(result["ranking"]) == sorted(listed)
        assert result["accepted"] == (result["ranking"][0] == target)
        assert result["attempts"] == (2 * result["accepted_round"] if result["accepted"] else 4)
        assert result["rounds"] == -(-result["attempts"] // 2)
        assert result["generated_tokens"] > 0 and "<|im_start|>assistant" in result["prompt"]
        assert json.loads(result["completion"])["recommendations"][0]  # the answer is the JSON the parser read


@pytest.mark.slow
def test_killed_run_resumes_without_regenerating_or_duplicating_rows(traces_run_dir, tmp_path):
    """Kill the stage (and its local Ray) after its first flush; the rerun keeps those rows and finishes the rest."""
    import ray

    run_dir = traces_run_dir
    overrides = [f"run_dir={run_dir.root}", *SMALL_PROMPTS, "max_rows=24", "batch_size=2", "flush_rows=2", "actors=1",
                 "num_cpus=2", "samples_per_round=2", "max_attempts=4", "continuous=true"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # Ray sockets need the short default cache path
    command = [sys.executable, "-m", "pipelines.traces", "--config", str(TINY_YAML), *overrides]
    parts_dir = Path(run_dir.local_path("traces", "_parts"))
    kill_when(command, lambda: bool(list(parts_dir.glob("*/part-*.parquet"))), "a first flushed part",
              tmp_path / "first-run.log", timeout=240, env=env)
    assert not run_dir.exists("traces", "reject.parquet")
    import pyarrow.parquet as pq

    first = pa.concat_tables([pq.read_table(p) for p in parts_dir.glob("*/part-*.parquet")])
    first_run = dict(zip(first.column("row_id").to_pylist(), first.column("run_id").to_pylist()))
    assert 0 < len(first_run) < 24
    cfg = load_config(TracesConfig, TINY_YAML, overrides)
    try:
        stats = run(cfg)
    finally:
        ray.shutdown()
    table = run_dir.read_parquet("traces", "reject.parquet")
    row_ids = table.column("row_id").to_pylist()
    assert row_ids == sorted(set(row_ids)) and len(row_ids) == 24 == stats["rows"]
    assert stats["resumed_rows"] == len(first_run) and stats["rows_this_run"] == 24 - len(first_run)
    kept = {r: run_id for r, run_id in zip(row_ids, table.column("run_id").to_pylist()) if r in first_run}
    assert kept == first_run  # rows of the killed run were not regenerated
    assert len(set(table.column("run_id").to_pylist())) >= 2
    assert run(cfg)["rows"] == 24  # finished: a rerun skips the stage
    with pytest.raises(StageOutputsMismatch, match="max_attempts"):
        run(load_config(TracesConfig, TINY_YAML, [*overrides, "max_attempts=6"]))
    assert set(ROWS_SCHEMA.names) <= set(table.column_names)
    assert np.isclose(stats["acceptance_rate"], np.mean(table.column("accepted").to_pylist()))


def test_target_mode_with_the_target_pinned_first_accepts_every_row(traces_run_dir):
    run_dir = traces_run_dir
    cfg = _config(run_dir.root, "mode=target", "bind_cores=false")
    assert cfg.pin_target_first  # the tiny preset pins it
    rows, _ = eligible_rows(run_dir.read_parquet("candidates", "train.parquet"), cfg)
    batch = rows.slice(0, 4).select(["row_id", "history", "candidates", "target"])
    teacher = TeacherBatch(str(run_dir.root), run_dir.local_path("models", "midtrain"), cfg.model_dump(mode="json"))
    out = teacher(batch).to_pylist()
    assert all(r["accepted"] and r["attempts"] == 1 for r in out)
    assert [r["ranking"][0] for r in out] == batch.column("target").to_pylist()
    assert all("actually bought this next" in r["prompt"] for r in out)
    with pytest.raises(ConfigError, match="pin_target_first"):
        _config(run_dir.root, "sampling.constrained=false")
