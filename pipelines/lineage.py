"""Lineage: what a stage read, so a rerun skips only when its config *and* its inputs are what they were.

Every stage stores, inside the fingerprint of its finished outputs, `inputs`: a digest of each file it reads from
the run directory (and, for `prepare`, from the dataset folder). A rerun compares that map as part of the
fingerprint; when only the inputs differ, `changed_inputs_message` names the files that changed, the stage that wrote
each one, and every stage that must rerun — and `overwrite=true` on that stage (or `make demo FROM=<stage>`, which
passes it to that stage and every later one) redoes exactly those.

Digests are of content (SHA-256) for files up to `FULL_DIGEST_BYTES`; larger files (a model's weights) are named by
size plus the digest of their first and last MiB, which is enough to tell a retrained or replaced file from the
one a stage read without reading gigabytes on every start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import pyarrow.fs as pafs

from rec.io import RunDir, writer_stage

FULL_DIGEST_BYTES = 512 * 2**20
EDGE_BYTES = 2**20

STAGES = ("prepare", "sid", "midtrain", "prerank", "traces", "sft", "rl", "evaluate")
"""The stages in the order `make demo` runs them."""

READS: dict[str, tuple[str, ...]] = {
    "sid": ("data/items.parquet",),
    "midtrain": ("data/items.parquet", "data/train.parquet", "sid/sid_map.parquet"),
    "prerank": ("data/train.parquet", "data/valid.parquet", "data/test.parquet", "sid/sid_map.parquet"),
    "traces": ("data/items.parquet", "data/dataset.json", "sid/sid_map.parquet", "candidates/train.parquet"),
    "sft": ("data/items.parquet", "data/dataset.json", "sid/sid_map.parquet"),
    "rl": ("data/items.parquet", "data/dataset.json", "sid/sid_map.parquet", "candidates/train.parquet",
           "candidates/valid.parquet"),
    "evaluate": ("data/items.parquet", "data/dataset.json", "sid/sid_map.parquet"),
}
"""Run-directory files each stage reads, besides the ones that depend on its config (an SFT stage's traces file,
an evaluation's split, the models: those are added by the stage)."""


def later_stages(stage: str) -> tuple[str, ...]:
    """The stages after `stage`: each reads, directly or through another stage, what the ones before it wrote."""
    return STAGES[STAGES.index(stage) + 1:] if stage in STAGES else ()


def file_digest(fs: pafs.FileSystem, path: str, size: int | None = None) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits); past `FULL_DIGEST_BYTES`, of its size and its two ends."""
    if size is None:
        size = fs.get_file_info(path).size
    digest = hashlib.sha256()
    with fs.open_input_file(path) as src:
        if size <= FULL_DIGEST_BYTES:
            for block in iter(lambda: src.read(8 * 2**20), b""):
                digest.update(block)
        else:
            digest.update(f"size={size}\n".encode())
            digest.update(src.read(EDGE_BYTES))
            src.seek(size - EDGE_BYTES)
            digest.update(src.read(EDGE_BYTES))
    return digest.hexdigest()[:16]


def run_inputs(run_dir: RunDir, paths: Iterable[str]) -> dict[str, str]:
    """{run-dir-relative path: digest} of files the stage is about to read; a missing one is "missing" (the stage
    then fails on it with the usual "run the stage that writes it first")."""
    out = {}
    for rel in sorted(set(paths)):
        info = run_dir.fs.get_file_info(run_dir.path(*rel.split("/")))
        out[rel] = file_digest(run_dir.fs, info.path, info.size) if info.type == pafs.FileType.File else "missing"
    return out


def stage_inputs(run_dir: RunDir, stage: str, extra: Iterable[str] = ()) -> dict[str, str]:
    """The digests of what `stage` reads: `READS[stage]` plus the config-dependent `extra` paths."""
    return run_inputs(run_dir, (*READS.get(stage, ()), *extra))


def local_files(paths: Iterable[str]) -> dict[str, str]:
    """{path: digest} of local files outside the run directory (a dataset folder's files)."""
    fs = pafs.LocalFileSystem()
    return {str(p): file_digest(fs, str(p)) for p in sorted(set(map(str, paths)))}


def inputs_changed(previous: Mapping, current: Mapping) -> bool:
    """True when two fingerprints differ in their inputs only (the config is the same)."""
    rest = lambda fp: {k: v for k, v in fp.items() if k != "inputs"}  # noqa: E731
    return previous.get("inputs") != current.get("inputs") and rest(previous) == rest(current)


def _writer(rel: str) -> str:
    return "you: a dataset file prepare reads" if rel.startswith("/") else writer_stage(*rel.split("/"))


def changed_inputs_message(stage: str, path: str, previous: Mapping, current: Mapping) -> str:
    """What changed between the inputs a stage read and the ones it would read now, and what must rerun.

    >>> print(changed_inputs_message("sid", "/r/sid/report.json", {"inputs": {"data/items.parquet": "a"}},
    ...                              {"inputs": {"data/items.parquet": "b"}}))  # doctest: +NORMALIZE_WHITESPACE
    sid: /r/sid/report.json was made from other inputs than the run directory holds now: data/items.parquet
    changed (written by prepare). Rerun sid with overwrite=true, and after it midtrain, prerank, traces, sft, rl,
    evaluate (they depend on what sid writes): `make demo FROM=sid`, or overwrite=true on each stage.
    """
    before, now = previous.get("inputs"), current.get("inputs") or {}
    if before is None:
        what = "it was written before this version recorded its inputs"
    else:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        what = "; ".join(
            f"{rel} {'is new' if rel not in before else 'is gone' if rel not in now else 'changed'} "
            f"(written by {_writer(rel)})" for rel in changed)
    later = later_stages(stage)
    after = f", and after it {', '.join(later)} (they depend on what {stage} writes)" if later else ""
    return (
        f"{stage}: {path} was made from other inputs than the run directory holds now: {what}. "
        f"Rerun {stage} with overwrite=true{after}: `make demo FROM={stage}`, or overwrite=true on each stage."
    )
