"""Lineage: a rerun skips only when the config and the files a stage read are what they were."""

from __future__ import annotations

import pytest

from conftest import write_jsonl
from pipelines.common import StageOutputsMismatch
from pipelines.lineage import READS, STAGES, changed_inputs_message, later_stages, run_inputs
from pipelines.prepare import PrepareConfig
from pipelines.prepare import run as run_prepare
from rec.io import RunDir


def test_prepare_reruns_only_when_its_dataset_files_are_the_same(small_dataset, tmp_path):
    cfg = PrepareConfig(run_dir=str(tmp_path / "run"), dataset_dir=str(small_dataset))
    first = run_prepare(cfg)
    assert run_prepare(cfg) == first  # same config, same files: skipped
    sequences = small_dataset / "sequences.jsonl"
    write_jsonl(sequences, [{"user_id": 1, "item_ids": [1, 2, 3, 4, 5]}, {"user_id": 2, "item_ids": [2, 3, 5]}])
    with pytest.raises(StageOutputsMismatch) as err:
        run_prepare(cfg)
    message = str(err.value)
    assert f"{sequences} changed" in message and "items.jsonl" not in message
    assert "Rerun prepare with overwrite=true, and after it sid, midtrain" in message
    assert "make demo FROM=prepare" in message
    redone = run_prepare(cfg.model_copy(update={"overwrite": True}))
    assert redone["users"] == 2
    assert run_prepare(cfg)["users"] == 2  # and the new files are what the next rerun compares with


def test_run_inputs_digest_content_not_time(small_dataset, tmp_path):
    run_dir = RunDir.open(str(tmp_path / "run"))
    run_prepare(PrepareConfig(run_dir=run_dir.root, dataset_dir=str(small_dataset)))
    before = run_inputs(run_dir, ["data/items.parquet", "data/train.parquet", "sid/sid_map.parquet"])
    assert before["sid/sid_map.parquet"] == "missing"
    items = (tmp_path / "run" / "data" / "items.parquet")
    items.write_bytes(items.read_bytes())  # rewritten, same bytes: same digest
    assert run_inputs(run_dir, ["data/items.parquet"])["data/items.parquet"] == before["data/items.parquet"]
    items.write_bytes(items.read_bytes() + b"\0")
    assert run_inputs(run_dir, ["data/items.parquet"])["data/items.parquet"] != before["data/items.parquet"]


def test_every_stage_reads_only_what_earlier_stages_write():
    order = {stage: i for i, stage in enumerate(STAGES)}
    writers = {"data": "prepare", "sid": "sid", "candidates": "prerank", "traces": "traces"}
    for stage, paths in READS.items():
        for path in paths:
            assert order[writers[path.split("/")[0]]] < order[stage], (stage, path)
    assert later_stages("sft") == ("rl", "evaluate") and later_stages("evaluate") == ()


def test_outputs_of_an_older_version_are_named_as_such():
    message = changed_inputs_message("rl", "/r/models/rl_ckpt/fingerprint.json", {"seed": 0},
                                     {"seed": 0, "inputs": {"data/items.parquet": "x"}})
    assert "written before this version recorded its inputs" in message and "after it evaluate" in message


def test_midtrain_refuses_sids_of_another_catalogue(tmp_path):
    from midtrain_fixtures import make_run_dir

    from pipelines.midtrain import check_every_item_has_a_sid
    from rec.data import DataError

    run_dir = make_run_dir(tmp_path / "run", max_users=5)
    items = run_dir.read_parquet("data", "items.parquet").column("item_id").to_pylist()
    check_every_item_has_a_sid(run_dir, items, items)
    first, second = sorted(items)[:2]
    with pytest.raises(DataError, match=rf"no SID for 2 of the {len(items)} items .* \(e.g. item {first}, {second}\): "
                                        r"it was written for another catalogue; rerun sid with overwrite=true"):
        check_every_item_has_a_sid(run_dir, items, sorted(items)[2:])


def test_sid_after_a_re_prepare_with_another_catalogue_says_what_to_rerun(tmp_path):
    """The reported bug: `prepare overwrite=true` with another catalogue, then sid said "already written with this
    config" and kept the old SIDs. Now sid refuses, naming the file and what to rerun; overwrite=true redoes it."""
    from catalogue_fixture import write_catalogue

    from pipelines.sid import SidConfig
    from pipelines.sid import run as run_sid

    run = tmp_path / "run"
    run_prepare(PrepareConfig(run_dir=str(run), dataset_dir=str(write_catalogue(tmp_path / "one", seed=0))))
    cfg = SidConfig(run_dir=str(run), levels=2, codebook_size=16, num_cpus=3,
                    embed={"batch_size": 16, "actors": 1, "cpus_per_actor": 1})
    first = run_sid(cfg)
    assert run_sid(cfg) == first  # same config, same items: skipped
    other = write_catalogue(tmp_path / "two", items=50, users=30, seed=1)
    run_prepare(PrepareConfig(run_dir=str(run), dataset_dir=str(other), overwrite=True))
    with pytest.raises(StageOutputsMismatch) as err:
        run_sid(cfg)
    assert "data/items.parquet changed (written by prepare)" in str(err.value)
    assert "Rerun sid with overwrite=true, and after it midtrain, prerank" in str(err.value)
    assert run_sid(cfg.model_copy(update={"overwrite": True}))["items"] == 50
