"""The prepare and sid stages run for real (local Ray, the bundled encoder) on small inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, write_jsonl
from pipelines.common import StageOutputsMismatch
from pipelines.prepare import PrepareConfig
from pipelines.prepare import run as run_prepare
from pipelines.sid import RqKMeansSection, SidConfig, format_report
from pipelines.sid import run as run_sid
from rec.sid import parse_sid


def test_prepare_writes_splits_and_report_and_is_idempotent(small_dataset, tmp_path):
    cfg = PrepareConfig(run_dir=str(tmp_path / "run"), dataset_dir=str(small_dataset))
    report = run_prepare(cfg)
    assert report["users"] == 3 and report["items"] == 6
    assert report["skips"]["users_skipped_too_short"] == 1 and report["skips"]["users_skipped_too_short_ids"] == [4]
    test = pq.read_table(tmp_path / "run" / "data" / "test.parquet").to_pylist()
    assert test[0] == {"user_id": 1, "history": [1, 2, 3], "target": 4}
    written = (tmp_path / "run" / "data" / "items.parquet").stat().st_mtime_ns
    assert run_prepare(cfg) == report  # a rerun skips the work ...
    assert (tmp_path / "run" / "data" / "items.parquet").stat().st_mtime_ns == written
    with pytest.raises(StageOutputsMismatch, match="max_users"):  # ... and refuses to mix two configs
        run_prepare(cfg.model_copy(update={"max_users": 2}))
    assert not list((tmp_path / "run" / "data").glob(".tmp-*"))


def test_cli_reports_bad_input_without_traceback(small_dataset, tmp_path):
    (small_dataset / "sequences.jsonl").write_text('{"user_id": 1, "item_ids": [1, 2, 99]}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.prepare", f"run_dir={tmp_path / 'run'}", f"dataset_dir={small_dataset}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "sequences.jsonl:1: user 1: item_ids[2] = 99 is not in the item table" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sid_stage_gives_every_item_a_unique_sid(tmp_path):
    words = ["rose", "matte", "lip", "nail", "gloss", "serum", "argan", "shampoo", "mask", "cream"]
    rng = np.random.default_rng(0)
    items = [{"item_id": i, "title": " ".join(rng.choice(words, size=3)), "categories": ["Beauty"]}
             for i in range(1, 61)]
    sequences = [{"user_id": u, "item_ids": [int(x) for x in rng.choice(np.arange(1, 61), 4, replace=False)]}
                 for u in range(1, 21)]
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "items.jsonl", items)
    write_jsonl(folder / "sequences.jsonl", sequences)
    run_dir = tmp_path / "run"
    run_prepare(PrepareConfig(run_dir=str(run_dir), dataset_dir=str(folder)))
    cfg = SidConfig(run_dir=str(run_dir), levels=2, codebook_size=8, num_cpus=4,
                    embed={"batch_size": 16, "actors": 1, "cpus_per_actor": 1})
    report = run_sid(cfg)
    assert report["items"] == 60 and report["levels"] == 3 and report["unique_fraction"] == 1.0
    assert set(report) >= {"items", "levels", "codebook_size", "unique_fraction", "unique_fraction_before_last_level",
                           "utilisation_per_level", "max_collision_group", "seconds"}
    sid_map = pq.read_table(run_dir / "sid" / "sid_map.parquet").to_pylist()
    assert sorted(r["item_id"] for r in sid_map) == list(range(1, 61))
    assert all(tuple(r["codes"]) == parse_sid(r["sid"]) for r in sid_map)
    assert len({r["sid"] for r in sid_map}) == 60
    assert "unique before last level" in format_report(report)
    # a quantiser change reuses the cached embeddings; the same config gives the same SIDs
    changed = run_sid(cfg.model_copy(update={"overwrite": True, "rq_kmeans": RqKMeansSection(max_iter=5)}))
    assert changed["seconds_embed"] == 0.0 and report["seconds_embed"] > 0
    run_sid(cfg.model_copy(update={"overwrite": True}))
    assert pq.read_table(run_dir / "sid" / "sid_map.parquet").to_pylist() == sid_map


def test_pinned_stack_imports():
    proc = subprocess.run(
        [sys.executable, "-c", "import ray, vllm, deepspeed, transformers, torch; "
         "print(ray.__version__, vllm.__version__, deepspeed.__version__, torch.__version__)"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ray_v, vllm_v, ds_v, torch_v = proc.stdout.split()[-4:]
    assert (ray_v, vllm_v, ds_v) == ("2.60.0", "0.32.0", "0.19.8") and torch_v.startswith("2.13.0")
