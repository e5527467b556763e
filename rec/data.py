"""Catalogue and interaction data: loading (JSONL or Parquet), validation, slicing, leave-one-out splits.

The input format is the one documented in `data/amazon_beauty_2014_5core/README.md`:

- items: one object per item with an integer `item_id` and text fields `title`, `brand`, `categories`
  (a list of strings, one category path), optional `description`, `asin`, `price`, `sales_rank`;
- sequences: one object per user with an integer `user_id` and `item_ids` in chronological order.

Both may be `.jsonl` (UTF-8), `.jsonl.gz` or `.parquet` with the same columns, so a user's own catalogue drops in.
Every problem is either a `DataError` that names the file, the line (or byte offset, or Parquet row group and row)
and the field, or a counted skip or change in the returned report. Text is cleaned once, here: HTML entities are
unescaped, control and invisible characters (NUL, bidi overrides, zero-width spaces, lone surrogates) are stripped and
over-long values are cut to `TextLimits`, so every later stage (embeddings, prompts, the Serve response) sees clean
text.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import html
import json
import math
import re
import reprlib
import zlib
from collections import Counter
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
# Fields of the documented format: a close misspelling of one of these is an error (a `tittle` would otherwise
# leave the item silently untitled); anything else is counted in the report and ignored.
ITEM_FIELDS = frozenset({"item_id", *_STRING_FIELDS, "categories", *_NUMBER_FIELDS})
SEQUENCE_FIELDS = frozenset({"user_id", "item_ids"})
# Documented (or written by this stage, like `text`) but not used: neither unknown nor a typo.
_UNUSED_FIELDS = {"items": frozenset({"sales_type", "text"}), "sequences": frozenset({"reviewer_id"})}
INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# C0/C1 controls except tab, newline and carriage return; DEL; zero-width space/joiners, word joiner and BOM;
# bidirectional embeddings, overrides and isolates; lone surrogates (a JSON "\ud800" decodes to one, and pyarrow
# cannot encode it). They are invisible in a terminal or a browser but reach the tokenizer and can reorder text.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_short_repr = reprlib.Repr()
_short_repr.maxstring, _short_repr.maxother, _short_repr.maxlist, _short_repr.maxlong = 60, 60, 6, 40


def _show(value: Any) -> str:
    r"""A bounded, escaped repr for messages: a 50 MB title or a control character never reaches the terminal.

    >>> _show("x" * 100)[:12], _show("\x1b[2J")
    ("'xxxxxxxxxxx", "'\\x1b[2J'")
    """
    return _short_repr.repr(value)


def _reason(err: BaseException) -> str:
    """A library's error message on one line (pyarrow's span several)."""
    return " ".join(str(err).split())[:300] or type(err).__name__


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
    unknown_fields: dict[str, Counter[str]] = field(default_factory=dict)
    """Input file name -> unknown field -> records that have it (the field is ignored)."""
    text_changes: dict[str, Counter[str]] = field(default_factory=dict)
    """Change (`CLEANING_CHANGES`) -> field -> values changed."""
    text_changed_item_ids: dict[str, list[int]] = field(default_factory=dict)
    """Change -> ids of the items changed, in file order."""

    def count_change(self, change: str, field_name: str, item_id: int) -> None:
        self.text_changes.setdefault(change, Counter())[field_name] += 1
        ids = self.text_changed_item_ids.setdefault(change, [])
        if not ids or ids[-1] != item_id:
            ids.append(item_id)

    def to_dict(self, max_ids: int = 20) -> dict[str, Any]:
        cleaning: dict[str, Any] = {}
        for change in CLEANING_CHANGES:
            cleaning[change] = dict(sorted(self.text_changes.get(change, Counter()).items()))
            cleaning[f"{change}_items"] = len(self.text_changed_item_ids.get(change, []))
            cleaning[f"{change}_item_ids"] = self.text_changed_item_ids.get(change, [])[:max_ids]
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
            "unknown_fields": {name: dict(counts.most_common()) for name, counts in self.unknown_fields.items()},
            "text_cleaning": cleaning,
        }


CLEANING_CHANGES = ("html_entities_unescaped", "invisible_characters_stripped", "truncated")


@dataclass(frozen=True)
class TextLimits:
    """Longest kept value of each text field, in characters; a longer value is cut and counted in the report."""

    title: int = 1000
    brand: int = 200
    category: int = 200
    """Each entry of `categories`."""
    description: int = 10_000
    asin: int = 100


def clean_text(value: str, max_chars: int) -> tuple[str, tuple[str, ...]]:
    r"""Unescape HTML entities once, strip control and invisible characters, cut to `max_chars`; also return which
    of `CLEANING_CHANGES` applied. Unescaping is done once, at ingestion: an entity escaped twice (`&amp;reg;`)
    keeps one level, and clean text passed again is unchanged unless it still holds such an entity.

    >>> clean_text("Lip &amp; Cheek\u200b\u202e", 1000)
    ('Lip & Cheek', ('html_entities_unescaped', 'invisible_characters_stripped'))
    >>> clean_text("Tab\tand newline\n are kept; NUL\x00 is not", 25)
    ('Tab\tand newline\n are kept', ('invisible_characters_stripped', 'truncated'))
    """
    changes = []
    unescaped = html.unescape(value) if "&" in value else value
    if unescaped != value:
        changes.append("html_entities_unescaped")
    visible = _INVISIBLE.sub("", unescaped)
    if visible != unescaped:
        changes.append("invisible_characters_stripped")
    if len(visible) > max_chars:
        visible = visible[:max_chars]
        changes.append("truncated")
    return visible, tuple(changes)


def _sentence(text: str) -> str:
    """`text` ending in a full stop, unless it already ends a sentence ("Co., Inc.", "Joop!", "Set...").

    >>> _sentence("NARS"), _sentence("Co., Inc."), _sentence("Joop!")
    ('NARS.', 'Co., Inc.', 'Joop!')
    """
    return text if text.endswith((".", "!", "?", "\u2026")) else text + "."


def item_text(item: dict[str, Any]) -> str:
    """The text an item is embedded and prompted by: title, brand, category path, description.

    The fields are expected clean (`clean_text`, as `load_items` does): nothing is unescaped a second time here.

    >>> item_text({"title": "Lip & Cheek", "brand": "NARS", "categories": ["Beauty", "Makeup"]})
    'Lip & Cheek. Brand: NARS. Category: Beauty > Makeup.'
    """
    parts = []
    title = (item.get("title") or "").strip()
    if title:
        parts.append(_sentence(title))
    brand = (item.get("brand") or "").strip()
    if brand and brand.lower() != "unknown":
        parts.append(_sentence(f"Brand: {brand}"))
    categories = [c.strip() for c in (item.get("categories") or []) if c and c.strip()]
    if categories:
        parts.append(_sentence("Category: " + " > ".join(categories)))
    description = (item.get("description") or "").strip()
    if description:
        parts.append(description)
    return " ".join(parts)


def _iter_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, record): location is `file:line` for JSONL, `file:row N` for Parquet."""
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_jsonl(path)
    elif path.name.endswith(".parquet"):
        yield from _iter_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type (use {', '.join(INPUT_SUFFIXES)})")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        repeated = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise ValueError(f"key {_show(repeated)} appears twice in one object")
    return record


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        raw = path.open("rb")
    except OSError as err:
        raise DataError(f"{path}: cannot be opened ({err.strerror or err})") from None
    with raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if compressed and not path.name.endswith(".gz"):
            raise DataError(f"{path}: is gzip-compressed; name it {path.name}.gz to read it as such, or gunzip it")
        if path.name.endswith(".gz") and not compressed:
            raise DataError(f"{path}: is not gzip-compressed despite its .gz name; rename it {path.name[:-3]}")
        src = gzip.open(raw) if compressed else raw
        offset, line_no = 0, 0
        uncompressed = " of the uncompressed stream" if compressed else ""
        try:
            for line_no, line in enumerate(src, start=1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{path}:{line_no}: not UTF-8 (byte {line[err.start]:#04x} at byte offset "
                        f"{offset + err.start}{uncompressed}); save the file as UTF-8, e.g. "
                        "`iconv -f latin1 -t utf-8` for a Latin-1 file"
                    ) from None
                offset += len(line)
                if line_no == 1:
                    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
                if not text.strip():
                    continue
                try:
                    record = json.loads(text, object_pairs_hook=_json_object)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})") from None
                except RecursionError:
                    raise DataError(f"{path}:{line_no}: malformed JSON (nested too deeply)") from None
                except ValueError as err:  # a repeated key, or an integer of more than 4300 digits
                    raise DataError(f"{path}:{line_no}: malformed JSON ({err})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield f"{path}:{line_no}", record
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(
                f"{path}: cannot be read after line {line_no} ({_reason(err)}); is the file truncated?"
            ) from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(
            f"{path}: not a readable Parquet file ({_reason(err)}); rewrite it, or give the data as .jsonl"
        ) from None
    row = 0
    for group in range(parquet.num_row_groups):
        try:
            records = parquet.read_row_group(group).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as err:
            raise DataError(
                f"{path}: row group {group} (from row {row}) cannot be read ({_reason(err)}); the file is corrupt, "
                "rewrite it"
            ) from None
        for record in records:
            yield f"{path}:row {row}", record
            row += 1


@functools.lru_cache(maxsize=1024)
def _likely_typo(name: str, known: frozenset[str]) -> str | None:
    """The known field `name` probably misspells (`tittle` -> `title`), if any.

    >>> _likely_typo("Tittle", ITEM_FIELDS), _likely_typo("sales_type", ITEM_FIELDS)
    ('title', None)
    """
    matches = difflib.get_close_matches(name.lower(), sorted(known), n=1, cutoff=0.8)
    return matches[0] if matches else None


def _check_fields(where: str, record: dict[str, Any], kind: str, known: frozenset[str], report: DataReport,
                  file_name: str) -> None:
    """Count unknown fields; a likely misspelling of a known field that the record lacks is an error."""
    for name in record:
        if name in known or name in _UNUSED_FIELDS[kind]:
            continue
        suggestion = _likely_typo(name, known) if isinstance(name, str) else None
        if suggestion is not None and record.get(suggestion) is None:
            raise DataError(
                f"{where}: unknown field {_show(name)}: did you mean {suggestion!r}? Rename it (otherwise the "
                f"{kind[:-1]} would have no {suggestion})"
            )
        report.unknown_fields.setdefault(file_name, Counter())[str(name)] += 1


def _check_int(where: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(
            f"{where}: field {name} must be an integer, got {_show(value)} (map your ids to integers first)"
        )
    value = int(value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise DataError(
            f"{where}: field {name} = {_show(value)} does not fit in 64 bits; renumber the ids to integers "
            f"in [{INT64_MIN}, {INT64_MAX}] (e.g. 1, 2, 3, ...)"
        )
    return value


def _require_int(where: str, record: dict[str, Any], name: str) -> int:
    value = record.get(name)
    if value is None:
        raise DataError(f"{where}: missing required field {name!r}")
    return _check_int(where, repr(name), value)


def _optional(where: str, record: dict[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if value is None:
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: field {name!r} must be a number or null, got {_show(value)}")
        if math.isnan(value):
            return None
        if math.isinf(value) or abs(value) > 1.8e308:  # a huge int would overflow the float64 column
            raise DataError(f"{where}: field {name!r} must be a finite number or null, got {_show(value)}")
        return float(value)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} must be {kind.__name__} or null, got {_show(value)}")
    return value


def load_items(path: str | Path, report: DataReport | None = None, limits: TextLimits | None = None) -> pa.Table:
    """Read, validate and clean the item table (`clean_text` on every text field, cut to `limits`).

    Items with no usable text are skipped; they, the cleaning changes and unknown fields are counted in `report`.
    """
    path = Path(path)
    report = report if report is not None else DataReport()
    limits = limits or TextLimits()
    seen: dict[int, str] = {}
    rows: dict[str, list[Any]] = {name: [] for name in ITEM_SCHEMA.names}

    def clean(item_id: int, name: str, value: str, max_chars: int) -> str:
        text, changes = clean_text(value, max_chars)
        for change in changes:
            report.count_change(change, name, item_id)
        return text

    for where, record in _iter_records(path):
        item_id = _require_int(where, record, "item_id")
        if item_id in seen:
            raise DataError(f"{where}: duplicate item_id {item_id} (first seen at {seen[item_id]})")
        seen[item_id] = where
        _check_fields(where, record, "items", ITEM_FIELDS, report, path.name)
        report.items_read += 1
        values: dict[str, Any] = {}
        for name in _STRING_FIELDS:
            value = _optional(where, record, name, str)
            values[name] = None if value is None else clean(item_id, name, value, getattr(limits, name))
        values.update({name: _optional(where, record, name, float) for name in _NUMBER_FIELDS})
        categories = record.get("categories")
        if categories is not None and (
            not isinstance(categories, (list, tuple)) or not all(isinstance(c, str) for c in categories)
        ):
            raise DataError(f"{where}: field 'categories' must be a list of strings or null, got {_show(categories)}")
        values["categories"] = [clean(item_id, "categories", c, limits.category) for c in categories or []]
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
        _check_fields(where, record, "sequences", SEQUENCE_FIELDS, report, path.name)
        item_ids = record.get("item_ids")
        if not isinstance(item_ids, (list, tuple)):
            raise DataError(f"{where}: field 'item_ids' must be a list of integers, got {_show(item_ids)}")
        report.users_read += 1
        kept: list[int] = []
        seen_in_user: set[int] = set()
        for position, raw in enumerate(item_ids):
            item_id = _check_int(where, f"item_ids[{position}]", raw)
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
    """`<dir>/<stem>.jsonl`, `.jsonl.gz` or `.parquet`: exactly one must exist, and be a file."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        problem = "is not a folder" if dataset_dir.exists() else "does not exist"
        raise DataError(f"{dataset_dir}: the dataset folder {problem} (set dataset_dir=<folder with {stem}.jsonl>)")
    names = [f"{stem}{suffix}" for suffix in INPUT_SUFFIXES]
    found = [dataset_dir / name for name in names if (dataset_dir / name).exists() or (dataset_dir / name).is_symlink()]
    if not found:
        raise DataError(f"{dataset_dir}: found none of {', '.join(names)}")
    if len(found) > 1:
        raise DataError(
            f"{dataset_dir}: both {' and '.join(p.name for p in found)} exist; keep only one (which one to read "
            "would be a guess)"
        )
    path = found[0]
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "is a broken link"
        raise DataError(f"{path}: {problem}; expected a {path.name.split('.', 1)[1]} file")
    return path


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
