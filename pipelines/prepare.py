"""Stage `prepare`: a dataset folder -> validated item table and leave-one-out splits under the run directory.

Reads `items.{jsonl,jsonl.gz,parquet}` and `sequences.{jsonl,jsonl.gz,parquet}` (format:
data/amazon_beauty_2014_5core/README.md), writes `<run_dir>/data/items.parquet`,
`<run_dir>/data/{train,valid,test}.parquet` and `<run_dir>/data/report.json` (sizes, counted skips, unknown fields,
text cleaning counts, config). Malformed input stops with exit 2 and a message naming the file, the line (or byte
offset, or Parquet row group) and the field.

Local:    python -m pipelines.prepare --config pipelines/configs/tiny/prepare.yaml [run_dir=runs/tiny max_users=2000]
Cluster:  ray job submit --working-dir . -- python -m pipelines.prepare --config pipelines/configs/qwen3_8b/prepare.yaml \
              run_dir=s3://YOUR-BUCKET/gr2/beauty
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipelines.common import REPO_ROOT, already_done, exit_on_user_error, parse_cli
from pipelines.lineage import local_files
from rec.config import Section, StageConfig, config_fingerprint
from rec.data import DataError, DataReport, TextLimits, find_file, leave_one_out, load_items, load_sequences, slice_users
from rec.io import RunDir

log = logging.getLogger("gr2.prepare")


class MaxCharsSection(Section):
    """Longest kept value of each item text field, in characters; longer values are cut and counted in the report
    (`skips.text_cleaning.truncated`). The defaults keep every bundled Beauty value whole."""

    title: int = Field(default=TextLimits.title, ge=1)
    brand: int = Field(default=TextLimits.brand, ge=1)
    category: int = Field(default=TextLimits.category, ge=1)
    """Each entry of `categories`."""
    description: int = Field(default=TextLimits.description, ge=1)
    asin: int = Field(default=TextLimits.asin, ge=1)


class PrepareConfig(StageConfig):
    dataset_dir: str
    """Folder with one items.{jsonl,jsonl.gz,parquet} and one sequences.{...} (and optionally dataset.json, the
    catalogue's metadata: `name`, `priming`); relative paths are tried from the working directory, then from the
    repository root. Required: every preset names its dataset."""
    max_users: int | None = Field(default=None, ge=1)
    """Keep a deterministic random slice of this many users (seeded by `seed`); null keeps all."""
    min_sequence_length: int = Field(default=3, ge=3)
    """Users with fewer usable items are skipped and counted (leave-one-out needs train, valid and test items)."""
    on_unknown_item: Literal["error", "drop"] = "error"
    """A sequence item missing from the item table: stop with the file and line, or drop it and count it."""
    max_chars: MaxCharsSection = Field(default_factory=MaxCharsSection)
    """Caps on item text fields (title 1,000, brand 200, each category 200, description 10,000, asin 100)."""
    overwrite: bool = False
    """Redo the stage even if its outputs exist (otherwise a rerun with the same config is a no-op)."""


DATASET_METADATA = "dataset.json"
METADATA_FIELDS = {"name": str, "priming": str, "citation": str}


def load_metadata(path: Path) -> dict[str, str]:
    """A dataset folder's optional `dataset.json`: {"name", "priming" (domain knowledge the re-rank prompt can add,
    see `prompt.priming: dataset`), "citation"}, each a string; absent file -> {}."""
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a JSON object ({err})") from None
    if not isinstance(metadata, dict):
        raise DataError(f"{path}: not a JSON object")
    for key, value in metadata.items():
        if key not in METADATA_FIELDS:
            raise DataError(f"{path}: unknown field {key!r} (known: {', '.join(METADATA_FIELDS)})")
        if not isinstance(value, METADATA_FIELDS[key]):
            raise DataError(f"{path}: field {key!r} must be a string, got {type(value).__name__}")
    return metadata


def resolve_dataset_dir(path: str) -> Path:
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO_ROOT / candidate


def run(cfg: PrepareConfig) -> dict:
    run_dir = RunDir.open(cfg.run_dir)
    dataset_dir = resolve_dataset_dir(cfg.dataset_dir)
    items_path, sequences_path = find_file(dataset_dir, "items"), find_file(dataset_dir, "sequences")
    metadata_path = dataset_dir / DATASET_METADATA
    read = [items_path, sequences_path, *([metadata_path] if metadata_path.is_file() else [])]
    fingerprint = config_fingerprint(cfg, exclude={"run_dir", "overwrite"}) | {"inputs": local_files(read)}
    if already_done(run_dir, ("data", "report.json"), fingerprint, cfg.overwrite, "prepare", type(cfg)):
        return run_dir.read_json("data", "report.json")
    start = time.perf_counter()
    report = DataReport()
    items = load_items(items_path, report, TextLimits(**cfg.max_chars.model_dump()))
    known = set(items.column("item_id").to_pylist())
    sequences = load_sequences(
        sequences_path,
        known_items=known,
        skipped_items=set(report.items_without_text),
        report=report,
        on_unknown_item=cfg.on_unknown_item,
        min_length=cfg.min_sequence_length,
    )
    sliced = slice_users(sequences, cfg.max_users, cfg.seed)
    splits = leave_one_out(sliced)
    metadata = load_metadata(metadata_path)
    run_dir.write_json(metadata, "data", DATASET_METADATA)
    run_dir.write_parquet(items, "data", "items.parquet")
    for name, table in splits.items():
        run_dir.write_parquet(table, "data", f"{name}.parquet")
    interactions = sum(len(seq) for _, seq in sliced)
    result = {
        "dataset_dir": str(dataset_dir),
        "dataset": metadata,
        "items": items.num_rows,
        "users": len(sliced),
        "users_before_slice": len(sequences),
        "interactions": interactions,
        "rows": {name: table.num_rows for name, table in splits.items()},
        "skips": report.to_dict(),
        "seconds": round(time.perf_counter() - start, 2),
        "config": fingerprint,
    }
    run_dir.write_json(result, "data", "report.json")  # written last: marks the stage as done
    return result


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(PrepareConfig, __doc__, argv)
    result = run(cfg)
    summary = {k: v for k, v in result.items() if k != "config"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
