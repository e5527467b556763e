"""A small run directory for the midtrain tests: a slice of the bundled Beauty data and random unique SIDs.

Built with the library functions the prepare and sid stages use (load_items, leave_one_out, disambiguate), so
the files follow the stage contracts (data/*.parquet, sid/sid_map.parquet) without running those stages.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rec.data import leave_one_out, load_items, load_sequences, slice_users
from rec.io import RunDir
from rec.sid.codes import render_sid
from rec.sid.quantize import disambiguate

DATASET = Path(__file__).resolve().parents[1] / "data" / "amazon_beauty_2014_5core"
LEVELS = 3  # two random levels + the disambiguation level
CODEBOOK_SIZE = 16


@functools.lru_cache(maxsize=1)
def _beauty() -> tuple[pa.Table, list[tuple[int, list[int]]]]:
    items = load_items(DATASET / "items.jsonl")
    known = set(items.column("item_id").to_pylist())
    sequences = load_sequences(DATASET / "sequences.jsonl", known, set())
    return items, sequences


def make_run_dir(
    root: Path, max_users: int | None = 120, seed: int = 0, levels: int = LEVELS, codebook_size: int = CODEBOOK_SIZE
) -> RunDir:
    """Write data/{items,train,valid,test}.parquet and sid/sid_map.parquet for `max_users` Beauty users.

    SIDs are `levels - 1` random codes plus the disambiguation level (the SID quality is irrelevant here).
    """
    all_items, sequences = _beauty()
    sequences = slice_users(sequences, max_users, seed)
    used = sorted({item for _, seq in sequences for item in seq})
    items = all_items.filter(pc.is_in(all_items.column("item_id"), pa.array(used, pa.int64())))
    run_dir = RunDir.open(str(root))
    run_dir.write_parquet(items, "data", "items.parquet")
    for split, table in leave_one_out(sequences).items():
        run_dir.write_parquet(table, "data", f"{split}.parquet")
    rng = np.random.default_rng(seed)
    codes = disambiguate(rng.integers(0, codebook_size, size=(len(used), levels - 1)), codebook_size, seed)
    sid_map = pa.table(
        {
            "item_id": pa.array(used, pa.int64()),
            "codes": pa.array(codes.tolist(), pa.list_(pa.int64())),
            "sid": [render_sid(c) for c in codes],
        }
    )
    run_dir.write_parquet(sid_map, "sid", "sid_map.parquet")
    run_dir.write_json({"levels": levels, "codebook_size": codebook_size, "items": len(used)}, "sid", "report.json")
    return run_dir
