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
from rec.config import Section, StageConfig, config_fingerprint
from rec.data import DataReport, TextLimits, find_file, leave_one_out, load_items, load_sequences, slice_users
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
    dataset_dir: str = "data/amazon_beauty_2014_5core"
    """Folder with one items.{jsonl,jsonl.gz,parquet} and one sequences.{...}; relative paths are tried from the working
    directory, then from the repository root."""
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


def resolve_dataset_dir(path: str) -> Path:
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO_ROOT / candidate


def run(cfg: PrepareConfig) -> dict:
    run_dir = RunDir.open(cfg.run_dir)
    fingerprint = config_fingerprint(cfg, exclude={"run_dir", "overwrite"})
    if already_done(run_dir, ("data", "report.json"), fingerprint, cfg.overwrite, "prepare"):
        return run_dir.read_json("data", "report.json")
    start = time.perf_counter()
    dataset_dir = resolve_dataset_dir(cfg.dataset_dir)
    report = DataReport()
    items_path, sequences_path = find_file(dataset_dir, "items"), find_file(dataset_dir, "sequences")
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
    run_dir.write_parquet(items, "data", "items.parquet")
    for name, table in splits.items():
        run_dir.write_parquet(table, "data", f"{name}.parquet")
    interactions = sum(len(seq) for _, seq in sliced)
    result = {
        "dataset_dir": str(dataset_dir),
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
