"""Malformed stage inputs (issue 14): each case breaks a small valid dataset one way and runs the real prepare stage.

Every case ends in a `DataError` naming the file, the line (or byte offset, or row group) and the field, or in counts
in `data/report.json`; the run-dir cases check that a truncated or foreign Parquet file names the stage to rerun.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, write_jsonl
from pipelines.prepare import PrepareConfig, run
from rec.data import DataError
from rec.io import RunDir, writer_stage

ITEMS = [{"item_id": i, "title": f"Item {i} lipstick", "brand": "Acme", "categories": ["Beauty", "Makeup"]}
         for i in range(1, 7)]
SEQUENCES = [{"user_id": 1, "item_ids": [1, 2, 3, 4]}, {"user_id": 2, "item_ids": [2, 3, 5]},
             {"user_id": 3, "item_ids": [6, 5, 4, 3, 2]}]


def dataset(folder: Path, items: list | None = None, sequences: list | None = None) -> Path:
    """A valid dataset folder (6 items, 3 users), with `items` / `sequences` records (dicts or raw lines) instead."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "items.jsonl", ITEMS if items is None else items)
    write_jsonl(folder / "sequences.jsonl", SEQUENCES if sequences is None else sequences)
    return folder


def with_item(index: int, **fields) -> list:
    records = [dict(record) for record in ITEMS]
    records[index].update(fields)
    return records


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return mutate


def items_line(line_no: int, text: bytes) -> Callable[[Path], None]:
    """Replace line `line_no` (1-based) of items.jsonl with raw bytes."""

    def mutate(folder: Path) -> None:
        lines = (folder / "items.jsonl").read_bytes().splitlines()
        lines[line_no - 1] = text
        (folder / "items.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    return mutate


def to_gzip(name: str, rename: str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = gzip.compress((folder / name).read_bytes())
        (folder / name).unlink()
        (folder / rename).write_bytes(data)

    return mutate


def items_as_parquet(table: pa.Table, **write_options) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / "items.jsonl").unlink()
        pq.write_table(table, folder / "items.parquet", **write_options)

    return mutate


def corrupt_second_row_group(folder: Path) -> None:
    table = pa.table({"item_id": [r["item_id"] for r in ITEMS], "title": [r["title"] for r in ITEMS]})
    items_as_parquet(table, row_group_size=3, use_dictionary=False, compression="none")(folder)
    path = folder / "items.parquet"
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    data[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))


def truncated_gzip(folder: Path) -> None:
    to_gzip("items.jsonl", "items.jsonl.gz")(folder)
    path = folder / "items.jsonl.gz"
    path.write_bytes(path.read_bytes()[:-30])


def replace_with_folder(name: str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()

    return mutate


def items_parquet_too(folder: Path) -> None:
    pq.write_table(pa.table({"item_id": [1], "title": ["a"]}), folder / "items.parquet")


def write_items(records: list) -> Callable[[Path], None]:
    return lambda folder: write_jsonl(folder / "items.jsonl", records)


def write_sequences(records: list) -> Callable[[Path], None]:
    return lambda folder: write_jsonl(folder / "sequences.jsonl", records)


LATIN1_TITLE = '{"item_id": 2, "title": "Crème brûlée balm"}'.encode("latin-1")
# (case id, how the valid dataset is broken, regex the DataError must match)
ERROR_CASES = [
    ("latin1", items_line(2, LATIN1_TITLE), r"items\.jsonl:2: not UTF-8 \(byte 0xe8 at byte offset \d+\).*iconv"),
    ("binary", write_bytes("items.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"),
     r"items\.jsonl:1: not UTF-8 \(byte 0x89 at byte offset 0\)"),
    ("gzip named .jsonl", lambda f: (f / "items.jsonl").write_bytes(gzip.compress((f / "items.jsonl").read_bytes())),
     r"items\.jsonl: is gzip-compressed; name it items\.jsonl\.gz"),
    (".gz that is not gzip", lambda f: (f / "sequences.jsonl").rename(f / "sequences.jsonl.gz"),
     r"sequences\.jsonl\.gz: is not gzip-compressed"),
    ("truncated gzip", truncated_gzip,
     r"items\.jsonl\.gz: cannot be read after line \d+ \(.*\); is the file truncated"),
    ("id beyond int64", write_items(with_item(2, item_id=2**64 + 3)),
     r"items\.jsonl:3: field 'item_id' = 18446744073709551619 does not fit in 64 bits"),
    ("sequence id beyond int64", write_sequences([*SEQUENCES[:1], {"user_id": 2, "item_ids": [2, -(2**70)]}]),
     r"sequences\.jsonl:2: field item_ids\[1\] = -\d+ does not fit in 64 bits"),
    ("corrupt parquet", lambda f: ((f / "items.jsonl").unlink(), (f / "items.parquet").write_bytes(b"PAR1 garbage")),
     r"items\.parquet: not a readable Parquet file \(.*\); rewrite it"),
    ("corrupt parquet row group", corrupt_second_row_group,
     r"items\.parquet: row group 1 \(from row 3\) cannot be read"),
    ("folder instead of file", replace_with_folder("items.jsonl"), r"items\.jsonl: is a folder; expected a jsonl file"),
    ("jsonl and parquet", items_parquet_too, r"both items\.jsonl and items\.parquet exist; keep only one"),
    ("typo of a field", write_items([*ITEMS[:1], {"item_id": 2, "tittle": "Lip balm"}, *ITEMS[2:]]),
     r"items\.jsonl:2: unknown field 'tittle': did you mean 'title'\?"),
    ("typo of a sequence field", write_sequences([{"user_id": 1, "itemids": [1, 2, 3]}]),
     r"sequences\.jsonl:1: unknown field 'itemids': did you mean 'item_ids'\?"),
    ("typo in parquet", items_as_parquet(pa.table({"item_id": [1, 2], "Title": ["a", "b"]})),
     r"items\.parquet:row 0: unknown field 'Title': did you mean 'title'\?"),
    ("repeated key", items_line(4, b'{"item_id": 4, "title": "a", "title": "b"}'),
     r"items\.jsonl:4: malformed JSON \(key 'title' appears twice in one object\)"),
    ("deep nesting", items_line(1, b'{"item_id": 1, "title": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     r"items\.jsonl:1: malformed JSON \(nested too deeply\)"),
    ("5000-digit integer", items_line(1, b'{"item_id": ' + b"9" * 5000 + b"}"), r"items\.jsonl:1: malformed JSON"),
    ("infinite price", write_items(with_item(0, price=float("inf"))),
     r"items\.jsonl:1: field 'price' must be a finite number or null"),
    ("no dataset folder", lambda f: [p.unlink() for p in f.iterdir()] and f.rmdir(),
     r"ds: the dataset folder does not exist"),
]


@pytest.mark.parametrize("mutate,expected", [case[1:] for case in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_malformed_input_is_an_error_naming_file_line_and_field(tmp_path, mutate, expected):
    folder = dataset(tmp_path / "ds")
    mutate(folder)
    with pytest.raises(DataError, match=expected) as raised:
        run(PrepareConfig(run_dir=str(tmp_path / "run"), dataset_dir=str(folder)))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run" / "data" / "report.json").exists()


def prepared(tmp_path: Path, items: list | None = None, sequences: list | None = None, **config) -> tuple[dict, dict]:
    """Run prepare on a dataset; return (report.json, items.parquet as {item_id: row})."""
    folder = dataset(tmp_path / "ds", items, sequences)
    run(PrepareConfig(run_dir=str(tmp_path / "run"), dataset_dir=str(folder), **config))
    report = json.loads((tmp_path / "run" / "data" / "report.json").read_text())
    rows = pq.read_table(tmp_path / "run" / "data" / "items.parquet").to_pylist()
    return report, {row["item_id"]: row for row in rows}


def test_unknown_fields_are_counted_per_name(tmp_path):
    items = [{**record, "colour": "red"} for record in ITEMS]
    items[0]["sales_type"] = "Beauty"  # documented in the data README: not unknown
    report, rows = prepared(tmp_path, items, [{**s, "reviewer_id": "A1", "session": 3} for s in SEQUENCES])
    assert report["skips"]["unknown_fields"] == {"items.jsonl": {"colour": 6}, "sequences.jsonl": {"session": 3}}
    assert len(rows) == 6


def test_a_close_name_is_not_a_typo_when_the_known_field_is_there(tmp_path):
    report, rows = prepared(tmp_path, [{**record, "titles": ["x"]} for record in ITEMS])
    assert report["skips"]["unknown_fields"] == {"items.jsonl": {"titles": 6}}
    assert rows[1]["title"] == "Item 1 lipstick"


def test_overlong_fields_are_cut_and_counted(tmp_path):
    items = with_item(1, title="t" * 2_000_000, description="d" * 20_000, categories=["Beauty", "c" * 500])
    report, rows = prepared(tmp_path, items)
    assert len(rows[2]["title"]) == 1000 and len(rows[2]["description"]) == 10_000
    assert rows[2]["categories"] == ["Beauty", "c" * 200]
    cleaning = report["skips"]["text_cleaning"]
    assert cleaning["truncated"] == {"categories": 1, "description": 1, "title": 1}
    assert cleaning["truncated_items"] == 1 and cleaning["truncated_item_ids"] == [2]


def test_length_caps_come_from_the_config(tmp_path):
    report, rows = prepared(tmp_path, max_chars={"title": 4})
    assert {row["title"] for row in rows.values()} == {"Item"}
    assert report["skips"]["text_cleaning"]["truncated"] == {"title": 6}
    assert report["config"]["max_chars"]["title"] == 4


def test_control_and_invisible_characters_are_stripped_and_counted(tmp_path):
    title = "Lip\x00stick\u202e kit\u200b\u2066\ufeff\x85 \ud800ok\tnow"
    items = with_item(0, title=title, brand="Ac\u200dme\x1b[31m")
    report, rows = prepared(tmp_path, items)
    assert rows[1]["title"] == "Lipstick kit ok\tnow"
    assert rows[1]["brand"] == "Acme[31m"
    assert rows[1]["text"].startswith("Lipstick kit ok\tnow. Brand: Acme[31m.")
    cleaning = report["skips"]["text_cleaning"]
    assert cleaning["invisible_characters_stripped"] == {"brand": 1, "title": 1}
    assert cleaning["invisible_characters_stripped_item_ids"] == [1]


def test_lone_surrogate_escape_from_json_is_stripped(tmp_path):
    report, rows = prepared(tmp_path, [*ITEMS[:5], '{"item_id": 6, "title": "Bad \\ud800 escape \\ud83d\\ude00"}'])
    assert rows[6]["title"] == "Bad  escape \U0001f600"  # the valid surrogate pair stays an emoji
    assert report["skips"]["text_cleaning"]["invisible_characters_stripped"] == {"title": 1}


def test_an_item_left_without_text_by_cleaning_is_skipped(tmp_path):
    report, rows = prepared(tmp_path, [*ITEMS[:5], {"item_id": 6, "title": "\u200b\u200b", "brand": "\x00"}])
    assert 6 not in rows and report["skips"]["items_skipped_without_text_ids"] == [6]


def test_html_entities_are_unescaped_once_at_ingestion(tmp_path):
    items = with_item(0, title="Lip &amp; Cheek &quot;Red&quot;", brand="L&#39;Or&eacute;al")
    items[1]["title"] = "Double &amp;amp; escaped"
    report, rows = prepared(tmp_path, items)
    assert rows[1]["title"] == 'Lip & Cheek "Red"' and rows[1]["brand"] == "L'Oréal"
    assert rows[1]["text"].startswith('Lip & Cheek "Red". Brand: L\'Oréal.')
    # Once, not until nothing changes: a title about "&amp;" could be meant; the item text agrees with the title.
    assert rows[2]["title"] == "Double &amp; escaped" and rows[2]["text"].startswith("Double &amp; escaped.")
    assert report["skips"]["text_cleaning"]["html_entities_unescaped"] == {"brand": 1, "title": 2}


def test_gzipped_jsonl_is_read(tmp_path):
    plain_report, plain_rows = prepared(tmp_path / "plain")
    folder = dataset(tmp_path / "gz")
    to_gzip("items.jsonl", "items.jsonl.gz")(folder)
    to_gzip("sequences.jsonl", "sequences.jsonl.gz")(folder)
    run(PrepareConfig(run_dir=str(tmp_path / "run_gz"), dataset_dir=str(folder)))
    rows = {r["item_id"]: r for r in pq.read_table(tmp_path / "run_gz" / "data" / "items.parquet").to_pylist()}
    assert rows == plain_rows
    assert pq.read_table(tmp_path / "run_gz" / "data" / "test.parquet").num_rows == plain_report["users"]


def test_byte_order_mark_is_accepted(tmp_path):
    folder = dataset(tmp_path / "ds")
    path = folder / "items.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    run(PrepareConfig(run_dir=str(tmp_path / "run"), dataset_dir=str(folder)))
    assert pq.read_table(tmp_path / "run" / "data" / "items.parquet").num_rows == 6


def test_uint64_parquet_ids_beyond_int64_name_the_row(tmp_path):
    folder = dataset(tmp_path / "ds")
    (folder / "sequences.jsonl").unlink()
    table = pa.table({"user_id": pa.array([1, 2**63 + 5], pa.uint64()), "item_ids": [[1, 2, 3], [1, 2, 3]]})
    pq.write_table(table, folder / "sequences.parquet")
    with pytest.raises(DataError, match=r"sequences\.parquet:row 1: field 'user_id' = 9223372036854775813 does not"):
        run(PrepareConfig(run_dir=str(tmp_path / "run"), dataset_dir=str(folder)))


def prepare_cli(tmp_path: Path, folder: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipelines.prepare", "--config", "pipelines/configs/tiny/prepare.yaml",
               f"run_dir={tmp_path / 'run'}", f"dataset_dir={folder}"]
    return subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_cli_exits_2_with_the_message_and_no_traceback(tmp_path):
    folder = dataset(tmp_path / "ds")
    items_line(2, LATIN1_TITLE)(folder)
    result = prepare_cli(tmp_path, folder)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: {folder / 'items.jsonl'}:2: not UTF-8" in result.stderr

    write_items([*ITEMS[:2], '{"item_id": 3, "brand": "\\ud800", "tittle": "x"}', *ITEMS[3:]])(folder)
    result = prepare_cli(tmp_path, folder)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "items.jsonl:3: unknown field 'tittle': did you mean 'title'?" in result.stderr


# --- between stages: run-dir files that are truncated, foreign or not JSON ----------------------------------------


@pytest.fixture
def prepared_run(tmp_path: Path) -> RunDir:
    run(PrepareConfig(run_dir=str(tmp_path / "run"), dataset_dir=str(dataset(tmp_path / "ds"))))
    return RunDir.open(str(tmp_path / "run"))


def test_truncated_parquet_names_the_file_and_the_stage_to_rerun(prepared_run):
    path = Path(prepared_run.path("data", "train.parquet"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"data/train\.parquet: cannot be read as Parquet \(.*magic bytes.*\); it is "
                                        r"written by stage prepare: rerun prepare with overwrite=true"):
        prepared_run.read_parquet("data", "train.parquet")


def test_foreign_parquet_without_the_expected_columns_is_named(prepared_run):
    prepared_run.write_parquet(pa.table({"user": [1], "items": [[1, 2]]}), "data", "train.parquet")
    with pytest.raises(DataError, match=r"data/train\.parquet: lacks the column\(s\) user_id, item_ids \(it has user, "
                                        r"items\); it is written by stage prepare"):
        prepared_run.read_parquet("data", "train.parquet")
    prepared_run.write_parquet(pa.table({"item_id": [1]}), "sid", "sid_map.parquet")
    with pytest.raises(DataError, match=r"sid/sid_map\.parquet: lacks the column\(s\) codes .*stage sid: rerun sid"):
        prepared_run.read_parquet("sid", "sid_map.parquet")  # known columns are checked by default
    with pytest.raises(DataError, match=r"sid/sid_map\.parquet: lacks the column\(s\) sid .*stage sid: rerun sid"):
        prepared_run.read_parquet("sid", "sid_map.parquet", required_columns=["item_id", "sid"])
    prepared_run.write_parquet(pa.table({"user_id": [1], "history": [[1]], "target": [2]}), "candidates",
                               "valid.parquet")
    with pytest.raises(DataError, match=r"candidates/valid\.parquet: lacks the column\(s\) candidates, scores .*"
                                        r"stage prerank"):
        prepared_run.read_parquet("candidates", "valid.parquet")


def test_corrupt_report_json_stops_the_rerun_naming_the_stage(prepared_run, tmp_path):
    Path(prepared_run.path("data", "report.json")).write_text('{"items": 6, "con')
    with pytest.raises(DataError, match=r"data/report\.json: cannot be read as JSON .*stage prepare: rerun prepare"):
        run(PrepareConfig(run_dir=prepared_run.root, dataset_dir=str(tmp_path / "ds")))


def test_missing_file_names_the_stage_that_writes_it(prepared_run):
    with pytest.raises(FileNotFoundError, match=r"candidates/test\.parquet does not exist; .*\(prerank\)"):
        prepared_run.read_parquet("candidates", "test.parquet")
    with pytest.raises(FileNotFoundError, match=r"models/rl/rl_report\.json does not exist; .*\(rl\)"):
        prepared_run.read_json("models", "rl", "rl_report.json")


@pytest.mark.parametrize("parts,stage", [
    (("data", "items.parquet"), "prepare"), (("sid", "report.json"), "sid"), (("candidates", "x.parquet"), "prerank"),
    (("traces", "stats_reject.json"), "traces"), (("eval", "rows_sft.parquet"), "evaluate"),
    (("models", "midtrain", "midtrain_report.json"), "midtrain"), (("models", "rl_uncond", "rl_report.json"), "rl"),
    (("models", "custom", "sft_report.json"), "sft"),
])
def test_writer_stage_of_each_run_dir_folder(parts, stage):
    assert writer_stage(*parts) == stage


def test_dataset_metadata_is_copied_and_checked(small_dataset, tmp_path):
    (small_dataset / "dataset.json").write_text(json.dumps({"name": "Six lipsticks", "priming": "Lips."}))
    report = run(PrepareConfig(run_dir=str(tmp_path / "run"), dataset_dir=str(small_dataset)))
    assert report["dataset"] == {"name": "Six lipsticks", "priming": "Lips."}
    assert json.loads((tmp_path / "run" / "data" / "dataset.json").read_text())["priming"] == "Lips."
    (small_dataset / "dataset.json").write_text(json.dumps({"nmae": "typo"}))
    with pytest.raises(DataError, match=r"dataset.json: unknown field 'nmae' \(known: name, priming, citation\)"):
        run(PrepareConfig(run_dir=str(tmp_path / "run2"), dataset_dir=str(small_dataset)))
