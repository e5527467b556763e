"""Run-directory I/O over pyarrow.fs: local paths or URIs (s3://, gs://, file://), atomic writes.

Every write goes to a temporary name in the same directory and is then renamed over the target, so a stage
killed mid-write never leaves a half-written file that a rerun would mistake for finished work. A file that is
unreadable anyway (truncated by a full disk, copied in by hand, from another version) is a `DataError` naming the
file and the stage that writes it, so the fix, rerunning that stage, is in the message.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rec.data import EVAL_SCHEMA, ITEM_SCHEMA, TRAIN_SCHEMA, DataError

# The stage that writes each top-level folder of a run directory (models/ is per output name: writer_stage).
WRITER_STAGES = {
    "data": "prepare",
    "sid": "sid",
    "candidates": "prerank",
    "prerank": "prerank",
    "traces": "traces",
    "eval": "evaluate",
}
# Columns a reader may rely on, for files whose schema is fixed in rec/ (others pass `required_columns`).
KNOWN_COLUMNS = {
    ("data", "items.parquet"): tuple(ITEM_SCHEMA.names),
    ("data", "train.parquet"): tuple(TRAIN_SCHEMA.names),
    ("data", "valid.parquet"): tuple(EVAL_SCHEMA.names),
    ("data", "test.parquet"): tuple(EVAL_SCHEMA.names),
    ("sid", "sid_map.parquet"): ("item_id", "codes"),
    # pipelines.prerank.CANDIDATES_SCHEMA (rec/ does not import pipelines/)
    **{("candidates", f"{split}.parquet"): ("user_id", "history", "target", "candidates", "scores")
       for split in ("train", "valid", "test")},
}


def writer_stage(*parts: str) -> str:
    """The stage that writes the run-dir file at `parts`, for messages that say what to rerun.

    >>> writer_stage("data", "train.parquet"), writer_stage("models", "sft_target", "sft_report.json")
    ('prepare', 'sft')
    >>> writer_stage("models", "mine", "x.json")
    'midtrain, sft or rl (whichever has output models/mine)'
    """
    if parts and parts[0] == "models":
        name = parts[1] if len(parts) > 1 else ""
        file_name = parts[-1] if len(parts) > 2 else ""
        for stage in ("midtrain", "sft", "rl"):
            if name.startswith(stage) or file_name.startswith(f"{stage}_"):
                return stage
        return f"midtrain, sft or rl (whichever has output models/{name})"
    return WRITER_STAGES.get(parts[0] if parts else "", "the stage that wrote it")

@dataclass(frozen=True)
class RunDir:
    """A run directory: `fs` is the pyarrow filesystem, `root` the path inside it."""

    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, uri: str) -> RunDir:
        if "://" not in uri:
            uri = os.path.abspath(uri)
            fs: pafs.FileSystem = pafs.LocalFileSystem()
            return cls(fs, uri)
        fs, root = pafs.FileSystem.from_uri(uri)
        return cls(fs, root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def local_path(self, *parts: str) -> str:
        """A path usable by libraries that only read local files (HF checkpoints); local run dirs only."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            raise ValueError(f"{self.root!r} is not a local run directory; this step needs a local path")
        return self.path(*parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def _atomic(self, parts: tuple[str, ...], write) -> str:
        target = self.path(*parts)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{target.rsplit('/', 1)[1]}"
        try:
            write(tmp)
            self.fs.move(tmp, target)
        except BaseException:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)
            raise
        return target

    def write_bytes(self, data: bytes, *parts: str) -> str:
        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)

        return self._atomic(parts, write)

    def write_json(self, obj: Any, *parts: str) -> str:
        return self.write_bytes((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), *parts)

    def _missing(self, parts: tuple[str, ...]) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.path(*parts)} does not exist; run the stage that writes it first ({writer_stage(*parts)})"
        )

    def _unreadable(self, parts: tuple[str, ...], what: str, err: BaseException) -> DataError:
        stage = writer_stage(*parts)
        reason = " ".join(str(err).split())[:300] or type(err).__name__  # pyarrow's messages span lines
        return DataError(
            f"{self.path(*parts)}: {what} ({reason}); it is written by stage {stage}: "
            f"rerun {stage} with overwrite=true (or into a new run_dir)"
        )

    def read_json(self, *parts: str) -> Any:
        """The JSON object at `parts`; a missing file is FileNotFoundError, an unreadable one a DataError."""
        if not self.exists(*parts):
            raise self._missing(parts)
        try:
            with self.fs.open_input_stream(self.path(*parts)) as src:
                return json.loads(src.read().decode())
        except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise self._unreadable(parts, "cannot be read as JSON", err) from None

    def write_parquet(self, table: pa.Table, *parts: str) -> str:
        return self._atomic(parts, lambda tmp: pq.write_table(table, tmp, filesystem=self.fs))

    def parquet_json_metadata(self, key: bytes, *parts: str) -> dict | None:
        """The JSON a stage stored under `key` in a Parquet file's schema metadata (its config fingerprint): None
        when the file does not exist, {} when it has no such key."""
        if not self.exists(*parts):
            return None
        try:
            raw = (pq.read_schema(self.path(*parts), filesystem=self.fs).metadata or {}).get(key)
            return json.loads(raw) if raw else {}
        except (pa.ArrowException, OSError, ValueError) as err:
            raise self._unreadable(parts, "cannot be read as Parquet", err) from None

    def read_parquet(self, *parts: str, required_columns: Sequence[str] | None = None) -> pa.Table:
        """The Parquet table at `parts`, with every column in `required_columns` (default: `KNOWN_COLUMNS` for the
        data/, sid_map and candidates files). A missing file is FileNotFoundError; a truncated or foreign one is a DataError naming the
        file and the stage to rerun."""
        if not self.exists(*parts):
            raise self._missing(parts)
        try:
            table = pq.read_table(self.path(*parts), filesystem=self.fs)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise self._unreadable(parts, "cannot be read as Parquet", err) from None
        required = KNOWN_COLUMNS.get(tuple(parts), ()) if required_columns is None else required_columns
        missing = [name for name in required if name not in table.column_names]
        if missing:
            raise self._unreadable(
                parts, f"lacks the column(s) {', '.join(missing)}",
                ValueError(f"it has {', '.join(table.column_names) or 'no columns'}"),
            )
        return table
