"""Data loading, validation errors that name the input, counted skips, slicing and leave-one-out."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import BEAUTY_DIR, write_jsonl
from rec.data import DataError, DataReport, item_text, leave_one_out, load_items, load_sequences, slice_users


def test_malformed_json_line_names_file_and_line(small_dataset):
    path = small_dataset / "items.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"item_id": 3, "title": "broken'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"items\.jsonl:3: malformed JSON"):
        load_items(path)


def test_duplicate_item_id_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "items.jsonl", [{"item_id": 1, "title": "a"}, {"item_id": 1, "title": "b"}])
    with pytest.raises(DataError, match=r"items\.jsonl:2: duplicate item_id 1 \(first seen at .*items\.jsonl:1\)"):
        load_items(path)


def test_item_id_must_be_an_integer(tmp_path):
    path = write_jsonl(tmp_path / "items.jsonl", [{"item_id": "B00X", "title": "a"}])
    with pytest.raises(DataError, match=r"items\.jsonl:1: field 'item_id' must be an integer"):
        load_items(path)


def test_wrong_field_type_is_named(tmp_path):
    path = write_jsonl(tmp_path / "items.jsonl", [{"item_id": 1, "title": "a", "categories": "Beauty"}])
    with pytest.raises(DataError, match=r"items\.jsonl:1: field 'categories' must be a list of strings"):
        load_items(path)


def test_item_without_text_is_skipped_and_counted_and_its_interactions_dropped(small_dataset):
    items_path = small_dataset / "items.jsonl"
    records = [{"item_id": i, "title": f"Item {i}"} for i in range(1, 6)] + [{"item_id": 6, "title": "  "}]
    write_jsonl(items_path, records)
    report = DataReport()
    items = load_items(items_path, report)
    assert items.num_rows == 5 and report.items_without_text == [6]
    sequences = load_sequences(
        small_dataset / "sequences.jsonl", set(items.column("item_id").to_pylist()), {6}, report
    )
    assert report.interactions_dropped_item_without_text == 1
    assert dict(sequences)[3] == [5, 4, 3, 2]
    summary = report.to_dict()
    assert summary["items_skipped_without_text"] == 1 and summary["items_skipped_without_text_ids"] == [6]


def test_untitled_item_falls_back_to_its_category_path():
    text = item_text({"title": None, "brand": None, "categories": ["Beauty", "Hair Care", "Hair Sprays"]})
    assert text == "Category: Beauty > Hair Care > Hair Sprays."


def test_a_field_that_already_ends_a_sentence_gets_no_second_full_stop():
    text = item_text({"title": "Detangler 6 oz.", "brand": "Sealed Unit Parts Co., Inc.",
                      "categories": ["Beauty", "Misc."], "description": "Soft."})
    assert text == "Detangler 6 oz. Brand: Sealed Unit Parts Co., Inc. Category: Beauty > Misc. Soft."
    assert item_text({"title": "Be a Dahlia Won't You?", "brand": "Joop!"}) == "Be a Dahlia Won't You? Brand: Joop!"
    assert item_text({"title": "Liter Set...", "brand": "Acme"}) == "Liter Set... Brand: Acme."


def test_unknown_item_in_sequence_names_line_user_and_item(small_dataset):
    with pytest.raises(DataError, match=r"sequences\.jsonl:2: user 2: item_ids\[2\] = 5 is not in the item table"):
        load_sequences(small_dataset / "sequences.jsonl", {1, 2, 3, 4, 6}, set())


def test_unknown_item_can_be_dropped_and_counted(small_dataset):
    report = DataReport()
    sequences = load_sequences(small_dataset / "sequences.jsonl", {1, 2, 3, 4, 6}, set(), report, on_unknown_item="drop")
    assert report.interactions_dropped_unknown_item == 2
    assert 2 not in dict(sequences)  # [2, 3] is too short once 5 is dropped
    assert 2 in report.users_dropped_too_short


def test_sequence_too_short_is_skipped_and_counted(small_dataset):
    report = DataReport()
    sequences = load_sequences(small_dataset / "sequences.jsonl", set(range(1, 7)), set(), report)
    assert [user for user, _ in sequences] == [1, 2, 3]
    assert report.users_dropped_too_short == [4]
    assert report.to_dict()["users_skipped_too_short"] == 1


def test_malformed_sequence_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "sequences.jsonl", [{"user_id": 1, "item_ids": "1 2 3"}])
    with pytest.raises(DataError, match=r"sequences\.jsonl:1: field 'item_ids' must be a list"):
        load_sequences(path, {1, 2, 3}, set())


def test_leave_one_out_never_puts_a_target_in_training():
    splits = leave_one_out([(1, [10, 11, 12, 13]), (2, [20, 21, 22])])
    train = {row["user_id"]: row["item_ids"] for row in splits["train"].to_pylist()}
    for name in ("valid", "test"):
        for row in splits[name].to_pylist():
            assert row["target"] not in train[row["user_id"]]
    assert splits["test"].to_pylist()[0] == {"user_id": 1, "history": [10, 11, 12], "target": 13}
    assert splits["valid"].to_pylist()[1] == {"user_id": 2, "history": [20], "target": 21}


def test_slice_is_deterministic_and_seed_dependent():
    sequences = [(u, [1, 2, 3]) for u in range(100)]
    a, b = slice_users(sequences, 10, seed=0), slice_users(sequences, 10, seed=0)
    assert a == b and len(a) == 10
    assert [u for u, _ in slice_users(sequences, 10, seed=1)] != [u for u, _ in a]


def test_parquet_input_loads_like_jsonl(tmp_path, small_dataset):
    jsonl_items = load_items(small_dataset / "items.jsonl")
    parquet_path = tmp_path / "items.parquet"
    pq.write_table(jsonl_items.drop_columns(["text"]), parquet_path)
    assert load_items(parquet_path).equals(jsonl_items)
    seq_path = tmp_path / "sequences.parquet"
    pq.write_table(pa.table({"user_id": [1], "item_ids": [[1, 2, 3]]}), seq_path)
    assert load_sequences(seq_path, {1, 2, 3}, set()) == [(1, [1, 2, 3])]


def test_bundled_beauty_data_loads_completely():
    report = DataReport()
    items = load_items(BEAUTY_DIR / "items.jsonl", report)
    sequences = load_sequences(BEAUTY_DIR / "sequences.jsonl", set(items.column("item_id").to_pylist()), set(), report)
    assert items.num_rows == 12101 and len(sequences) == 22363
    assert report.interactions_read == 198502
    assert not report.items_without_text and not report.users_dropped_too_short
    assert "&amp;" not in " ".join(items.column("text").to_pylist())
    # Entities are unescaped in the stored fields too (the Serve response shows `title`), once; nothing else changes.
    stored = items.column("title").to_pylist() + items.column("brand").to_pylist()
    assert "&amp;" not in " ".join(value or "" for value in stored)
    assert report.text_changes == {"html_entities_unescaped": {"title": 1236, "brand": 820}}
    assert not report.unknown_fields  # sales_type and reviewer_id are documented, merely unused
