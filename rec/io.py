"""Run-directory I/O over pyarrow.fs: local paths or URIs (s3://, gs://, file://), atomic writes.

Every write goes to a temporary name in the same directory and is then renamed over the target, so a stage
killed mid-write never leaves a half-written file that a rerun would mistake for finished work.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


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

    def read_json(self, *parts: str) -> Any:
        with self.fs.open_input_stream(self.path(*parts)) as src:
            return json.loads(src.read().decode())

    def write_parquet(self, table: pa.Table, *parts: str) -> str:
        return self._atomic(parts, lambda tmp: pq.write_table(table, tmp, filesystem=self.fs))

    def parquet_json_metadata(self, key: bytes, *parts: str) -> dict | None:
        """The JSON a stage stored under `key` in a Parquet file's schema metadata (its config fingerprint): None
        when the file does not exist, {} when it has no such key."""
        if not self.exists(*parts):
            return None
        raw = (pq.read_schema(self.path(*parts), filesystem=self.fs).metadata or {}).get(key)
        return json.loads(raw) if raw else {}

    def read_parquet(self, *parts: str) -> pa.Table:
        path = self.path(*parts)
        if not self.exists(*parts):
            raise FileNotFoundError(f"{path} does not exist; run the stage that writes it first")
        return pq.read_table(path, filesystem=self.fs)
