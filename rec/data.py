"""Catalogue and interaction data: loading (JSONL or Parquet), validation, slicing, leave-one-out splits.

The input format is the one documented in `data/amazon_beauty_2014_5core/README.md`:

- items: one object per item with an integer `item_id` and text fields `title`, `brand`, `categories`
  (a list of strings, one category path), optional `description`, `asin`, `price`, `sales_rank`;
- sequences: one object per user with an integer `user_id` and `item_ids` in chronological order.

Both may be `.jsonl` or `.parquet` with the same columns, so a user's own catalogue drops in. Every problem is
either an error that names the file and line (or row, or item id) or a counted skip in the returned report.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("asin", pa.string()),
        ("title", pa.string()),
        ("brand", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("description", pa.string()),
        ("price", pa.float64()),
        ("sales_rank", pa.float64()),
        ("text", pa.string()),
    ]
)
TRAIN_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_ids", pa.list_(pa.int64()))])
EVAL_SCHEMA = pa.schema([("user_id", pa.int64()), ("history", pa.list_(pa.int64())), ("target", pa.int64())])

_STRING_FIELDS = ("asin", "title", "brand", "description")
_NUMBER_FIELDS = ("price", "sales_rank")


class DataError(ValueError):
    """Input data is malformed; the message names the file, the line or row, and the field or item."""


@dataclass
class DataReport:
    """Counted skips and sizes; written into the prepare stage's report so nothing is lost silently."""

    items_read: int = 0
    items_without_text: list[int] = field(default_factory=list)
    users_read: int = 0
    interactions_read: int = 0
    interactions_dropped_unknown_item: int = 0
    interactions_dropped_item_without_text: int = 0
    users_dropped_too_short: list[int] = field(default_factory=list)
    duplicate_interactions_dropped: int = 0

    def to_dict(self, max_ids: int = 20) -> dict[str, Any]:
        return {
            "items_read": self.items_read,
            "items_skipped_without_text": len(self.items_without_text),
            "items_skipped_without_text_ids": self.items_without_text[:max_ids],
            "users_read": self.users_read,
            "interactions_read": self.interactions_read,
            "interactions_dropped_unknown_item": self.interactions_dropped_unknown_item,
            "interactions_dropped_item_without_text": self.interactions_dropped_item_without_text,
            "duplicate_interactions_dropped": self.duplicate_interactions_dropped,
            "users_skipped_too_short": len(self.users_dropped_too_short),
            "users_skipped_too_short_ids": self.users_dropped_too_short[:max_ids],
        }


def item_text(item: dict[str, Any]) -> str:
    """The text an item is embedded and prompted by: title, brand, category path, description, unescaped.

    >>> item_text({"title": "Lip &amp; Cheek", "brand": "NARS", "categories": ["Beauty", "Makeup"]})
    'Lip & Cheek. Brand: NARS. Category: Beauty > Makeup.'
    """
    parts = []
    title = (item.get("title") or "").strip()
    if title:
        parts.append(html.unescape(title).rstrip(".") + ".")
    brand = (item.get("brand") or "").strip()
    if brand and brand.lower() != "unknown":
        parts.append(f"Brand: {html.unescape(brand)}.")
    categories = [c.strip() for c in (item.get("categories") or []) if c and c.strip()]
    if categories:
        parts.append("Category: " + " > ".join(html.unescape(c) for c in categories) + ".")
    description = (item.get("description") or "").strip()
    if description:
        parts.append(html.unescape(description))
    return " ".join(parts)


def _iter_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, record) where location is `file:line` for JSONL or `file:row N` for Parquet."""
    if path.suffix == ".jsonl":
        with path.open("r", encoding="utf-8") as src:
            for line_no, line in enumerate(src, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield f"{path}:{line_no}", record
    elif path.suffix == ".parquet":
        table = pq.read_table(path)
        for row_no, record in enumerate(table.to_pylist()):
            yield f"{path}:row {row_no}", record
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")


def _require_int(where: str, record: dict[str, Any], name: str) -> int:
    value = record.get(name)
    if value is None:
        raise DataError(f"{where}: missing required field {name!r}")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{where}: field {name!r} must be an integer, got {value!r} (map your ids to integers first)")
    return int(value)


def _optional(where: str, record: dict[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if value is None:
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: field {name!r} must be a number or null, got {value!r}")
        return None if math.isnan(value) else float(value)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} must be {kind.__name__} or null, got {value!r}")
    return value


def load_items(path: str | Path, report: DataReport | None = None) -> pa.Table:
    """Read and validate the item table; items with no usable text are skipped and counted in `report`."""
    path = Path(path)
    report = report if report is not None else DataReport()
    seen: dict[int, str] = {}
    rows: dict[str, list[Any]] = {name: [] for name in ITEM_SCHEMA.names}
    for where, record in _iter_records(path):
        item_id = _require_int(where, record, "item_id")
        if item_id in seen:
            raise DataError(f"{where}: duplicate item_id {item_id} (first seen at {seen[item_id]})")
        seen[item_id] = where
        report.items_read += 1
        values = {name: _optional(where, record, name, str) for name in _STRING_FIELDS}
        values.update({name: _optional(where, record, name, float) for name in _NUMBER_FIELDS})
        categories = record.get("categories")
        if categories is not None and (
            not isinstance(categories, (list, tuple)) or not all(isinstance(c, str) for c in categories)
        ):
            raise DataError(f"{where}: field 'categories' must be a list of strings or null, got {categories!r}")
        values["categories"] = list(categories) if categories is not None else []
        text = item_text(values)
        if not text:
            report.items_without_text.append(item_id)
            continue
        values["item_id"] = item_id
        values["text"] = text
        for name in ITEM_SCHEMA.names:
            rows[name].append(values[name])
    if not rows["item_id"]:
        raise DataError(f"{path}: no usable items (read {report.items_read})")
    table = pa.table(rows, schema=ITEM_SCHEMA)
    return table.sort_by("item_id")


def load_sequences(
    path: str | Path,
    known_items: set[int],
    skipped_items: set[int],
    report: DataReport | None = None,
    on_unknown_item: str = "error",
    min_length: int = 3,
) -> list[tuple[int, list[int]]]:
    """Read user sequences, checking every item id against the catalogue.

    An id never seen in the catalogue is an error naming the line (or, with `on_unknown_item="drop"`, a counted
    drop); an id whose item was skipped for lack of text is dropped and counted. A user left with fewer than
    `min_length` items cannot be split leave-one-out and is skipped and counted.
    """
    if on_unknown_item not in ("error", "drop"):
        raise ValueError(f"on_unknown_item must be 'error' or 'drop', got {on_unknown_item!r}")
    path = Path(path)
    report = report if report is not None else DataReport()
    users: dict[int, str] = {}
    sequences: list[tuple[int, list[int]]] = []
    for where, record in _iter_records(path):
        user_id = _require_int(where, record, "user_id")
        if user_id in users:
            raise DataError(f"{where}: duplicate user_id {user_id} (first seen at {users[user_id]})")
        users[user_id] = where
        item_ids = record.get("item_ids")
        if not isinstance(item_ids, (list, tuple)):
            raise DataError(f"{where}: field 'item_ids' must be a list of integers, got {item_ids!r}")
        report.users_read += 1
        kept: list[int] = []
        seen_in_user: set[int] = set()
        for position, raw in enumerate(item_ids):
            if isinstance(raw, bool) or not isinstance(raw, (int, np.integer)):
                raise DataError(f"{where}: item_ids[{position}] must be an integer, got {raw!r}")
            item_id = int(raw)
            report.interactions_read += 1
            if item_id in skipped_items:
                report.interactions_dropped_item_without_text += 1
                continue
            if item_id not in known_items:
                if on_unknown_item == "error":
                    raise DataError(
                        f"{where}: user {user_id}: item_ids[{position}] = {item_id} is not in the item table "
                        "(add it to the catalogue, or set on_unknown_item=drop to drop such interactions)"
                    )
                report.interactions_dropped_unknown_item += 1
                continue
            if item_id in seen_in_user:
                # A repeat purchase would make the same item both history and target; keep the first one.
                report.duplicate_interactions_dropped += 1
                continue
            seen_in_user.add(item_id)
            kept.append(item_id)
        if len(kept) < min_length:
            report.users_dropped_too_short.append(user_id)
            continue
        sequences.append((user_id, kept))
    if not sequences:
        raise DataError(f"{path}: no user has at least {min_length} usable items (read {report.users_read})")
    sequences.sort(key=lambda pair: pair[0])
    return sequences


def find_file(dataset_dir: str | Path, stem: str) -> Path:
    """`<dir>/<stem>.jsonl` or `<dir>/<stem>.parquet`, whichever exists."""
    dataset_dir = Path(dataset_dir)
    for suffix in (".jsonl", ".parquet"):
        candidate = dataset_dir / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise DataError(f"{dataset_dir}: found neither {stem}.jsonl nor {stem}.parquet")


def slice_users(
    sequences: list[tuple[int, list[int]]], max_users: int | None, seed: int
) -> list[tuple[int, list[int]]]:
    """A deterministic random subset of `max_users` users (same seed -> same users), in user order."""
    if max_users is None or max_users >= len(sequences):
        return sequences
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(sequences), size=max_users, replace=False))
    return [sequences[i] for i in chosen]


def leave_one_out(sequences: list[tuple[int, list[int]]]) -> dict[str, pa.Table]:
    """Split each sequence: last item = test target, second last = valid target, the rest = train.

    >>> splits = leave_one_out([(7, [1, 2, 3, 4])])
    >>> splits["train"].to_pylist(), splits["valid"].to_pylist(), splits["test"].to_pylist()
    ([{'user_id': 7, 'item_ids': [1, 2]}], [{'user_id': 7, 'history': [1, 2], 'target': 3}], \
[{'user_id': 7, 'history': [1, 2, 3], 'target': 4}])
    """
    users = [user for user, _ in sequences]
    for user, items in sequences:
        if len(items) < 3:
            raise DataError(f"user {user}: {len(items)} items; leave-one-out needs at least 3")
    train = pa.table({"user_id": users, "item_ids": [items[:-2] for _, items in sequences]}, schema=TRAIN_SCHEMA)
    valid = pa.table(
        {"user_id": users, "history": [items[:-2] for _, items in sequences],
         "target": [items[-2] for _, items in sequences]},
        schema=EVAL_SCHEMA,
    )
    test = pa.table(
        {"user_id": users, "history": [items[:-1] for _, items in sequences],
         "target": [items[-1] for _, items in sequences]},
        schema=EVAL_SCHEMA,
    )
    return {"train": train, "valid": valid, "test": test}
