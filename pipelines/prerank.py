"""Stage `prerank`: the mid-trained model, decoding under the SID trie, proposes N candidates per row.

Reads `<run_dir>/data/{train,valid,test}.parquet`, `<run_dir>/sid/{sid_map.parquet,report.json}` and the model
(`<run_dir>/models/midtrain/`, or `model`); runs constrained beam search over the whole catalogue (rec.beam, the
vLLM back-end in rec.engines) as a Ray Data actor pool of vLLM engines, each CPU actor bound to its own cores;
writes `<run_dir>/candidates/{train,valid,test}.parquet` (user_id, history, target, candidates, scores) and
`<run_dir>/prerank/metrics.json` (recall/NDCG@5,10 and target_in_candidates on the test rows; target_in_candidates
of the train and valid rows).

Rows: test = full history minus the last item (target = last); valid = history minus the last two (target = the
second last); train = for each user the `train_prefixes_per_user` most recent prefixes of the sequence without its
test item (the valid target first, then train-split items), dropping any row that holds the user's test target.
Prompts are `rec.midtrain_data.next_item_prompt_ids`, exactly what mid-training taught.

Resumable: finished results are flushed to `candidates/_parts/` every `flush_rows` rows, a rerun skips them, a
finished split carries its config in its Parquet metadata and is skipped by a rerun with the same config.

Local:    python -m pipelines.prerank --config pipelines/configs/tiny/prerank.yaml [run_dir=runs/tiny max_users.test=null]
Cluster:  ray job submit --working-dir . -- python -m pipelines.prerank --config pipelines/configs/tiny/prerank.yaml \\
              run_dir=/mnt/shared/gr2/beauty actors=8
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pydantic import Field, model_validator

from pipelines.common import (
    EngineActorsConfig,
    Parts,
    config_mismatch,
    exit_on_user_error,
    model_digest,
    parse_cli,
    start_sid_ranker,
    stream_actor_pool,
)
from pipelines.lineage import stage_inputs
from rec.config import Section, config_fingerprint
from rec.io import RunDir
from rec.metrics import ranking_metrics, target_ranks

log = logging.getLogger("gr2.prerank")

SPLITS = ("train", "valid", "test")
META_KEY = b"gr2_prerank_config"
CANDIDATES_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("history", pa.list_(pa.int64())), ("target", pa.int64()),
     ("candidates", pa.list_(pa.int64())), ("scores", pa.list_(pa.float32()))]
)


class SplitUsers(Section):
    """How many users (the first ones of each data file) each split takes; null takes all."""

    train: int | None = Field(default=None, ge=0)
    valid: int | None = Field(default=None, ge=0)
    test: int | None = Field(default=None, ge=0)


class PrerankConfig(EngineActorsConfig):
    model: str | None = None
    """Checkpoint to decode with (a local path); null is `<run_dir>/models/midtrain`."""
    backend: Literal["torch", "vllm", "hf"] = "torch"
    """torch: the batched beam search on the model (one prefill per user, one forward per SID level; each actor's
    GPU when it has one); vllm: a Python-driven beam over a vLLM engine; hf: HF generate with the vectorised trie
    processor (the reference, slowest). All three return the same top-N (tests/test_beam_torch.py)."""
    max_users: SplitUsers = Field(default_factory=SplitUsers)
    """Users per split (the first N of data/{split}.parquet; train rows come from the first N train users)."""
    train_prefixes_per_user: int | None = Field(default=2, ge=1)
    """Training rows per user: this many most recent prefixes (null: every prefix after min_history items)."""
    train_include_valid: bool = True
    """The valid target is the most recent training prefix; false keeps the valid rows out of training."""
    min_history: int = Field(default=1, ge=0)
    """Training prefixes have at least this many history items."""
    num_beams: int = Field(default=20, ge=1)
    """Beam width of the constrained search."""
    top_n: int = Field(default=10, ge=1)
    """Candidates per row."""
    exclude_history: bool = True
    """Never propose an item already in the row's history (masked at the last SID level)."""
    overwrite: bool = False
    """Recompute every split from scratch (otherwise finished splits are kept, and a different config is an error)."""

    @model_validator(mode="after")
    def _check(self) -> PrerankConfig:
        if self.top_n > self.num_beams:
            raise ValueError(f"top_n ({self.top_n}) must be <= num_beams ({self.num_beams})")
        return self


def build_rows(
    train: pa.Table, valid: pa.Table, test: pa.Table, cfg: PrerankConfig
) -> dict[str, pa.Table]:
    """The rows to pre-rank per split: (row_id, user_id, history, target), in a deterministic order."""
    def first(table: pa.Table, n: int | None) -> pa.Table:
        return table if n is None else table.slice(0, n)

    rows = {}
    for split, table in (("valid", valid), ("test", test)):
        table = first(table, getattr(cfg.max_users, split)).select(["user_id", "history", "target"])
        rows[split] = table
    valid_target = dict(zip(valid.column("user_id").to_pylist(), valid.column("target").to_pylist()))
    test_target = dict(zip(test.column("user_id").to_pylist(), test.column("target").to_pylist()))
    users, histories, targets = [], [], []
    for user, items in zip(*(first(train, cfg.max_users.train).column(c).to_pylist() for c in ("user_id", "item_ids"))):
        if user not in valid_target or user not in test_target:
            raise ValueError(f"user {user} of data/train.parquet has no valid/test row; rerun the prepare stage")
        sequence = items + [valid_target[user]] if cfg.train_include_valid else items
        positions = range(max(cfg.min_history, 0), len(sequence))
        if cfg.train_prefixes_per_user is not None:
            positions = positions[-cfg.train_prefixes_per_user:]
        held_out = test_target[user]
        for position in positions:
            history = sequence[:position]
            if sequence[position] == held_out or held_out in history:  # no test target in any training row
                continue
            users.append(user)
            histories.append(history)
            targets.append(sequence[position])
    rows["train"] = pa.table(
        {"user_id": users, "history": histories, "target": targets},
        schema=pa.schema([("user_id", pa.int64()), ("history", pa.list_(pa.int64())), ("target", pa.int64())]),
    )
    return {split: rows[split].append_column("row_id", pa.array(np.arange(rows[split].num_rows), pa.int64()))
            for split in SPLITS}


class PrerankBatch:
    """Ray Data actor: rows (split, row_id, history) -> top-N candidates; one engine per actor, built once."""

    def __init__(self, run_dir: str, model: str, codebook_size: int, cfg: dict[str, Any]):
        from pipelines.common import setup_logging

        setup_logging()
        self.cfg = cfg = PrerankConfig.model_validate(cfg)
        self.ranker, self._core_lock = start_sid_ranker(RunDir.open(run_dir), model, codebook_size, cfg.engine,
                                                        cfg.backend, cfg.num_beams, cfg.top_n, cfg.cpus_per_actor,
                                                        cfg.gpus_per_actor, cfg.bind_cores)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = self.ranker.rank(batch.column("history").to_pylist(), self.cfg.exclude_history)
        return pa.table({
            "split": batch.column("split"),
            "row_id": batch.column("row_id"),
            "candidates": pa.array([[i for i, _ in r] for r in results], pa.list_(pa.int64())),
            "scores": pa.array([[s for _, s in r] for r in results], pa.list_(pa.float32())),
        })


def split_fingerprints(cfg: PrerankConfig, model: str, run_dir: RunDir) -> dict[str, dict[str, Any]]:
    """Per split: the config (but the split's slice of users), the model and the digests of the files read."""
    common = config_fingerprint(cfg, exclude=PrerankConfig.RESOURCE_FIELDS | {"max_users"})
    common["engine"].pop("kv_cache_memory_bytes", None)
    common["model_digest"] = model_digest(model)
    common["inputs"] = stage_inputs(run_dir, "prerank")
    return {split: {**common, "max_users": getattr(cfg.max_users, split)} for split in SPLITS}


def _fingerprint_of(run_dir: RunDir, split: str) -> dict | None:
    return run_dir.parquet_json_metadata(META_KEY, "candidates", f"{split}.parquet")


def _parts(run_dir: RunDir, split: str, fingerprint: dict) -> Parts:
    return Parts(run_dir, "candidates", split, fingerprint)


def run_search(cfg: PrerankConfig, run_dir: RunDir, model: str, pending: pa.Table, fingerprints: dict) -> None:
    """Pre-rank the `pending` rows (split, row_id, history) on a Ray Data actor pool; results go to the parts."""
    results = stream_actor_pool(cfg, pending, PrerankBatch, {
        "run_dir": cfg.run_dir, "model": model,
        "codebook_size": int(run_dir.read_json("sid", "report.json")["codebook_size"]),
        "cfg": cfg.model_dump(mode="json"),
    })
    start, done, buffered = time.perf_counter(), 0, []

    def flush() -> None:
        table = pa.concat_tables(buffered)
        buffered.clear()
        for split in SPLITS:
            part = table.filter(pc.equal(table.column("split"), split))
            if part.num_rows:
                _parts(run_dir, split, fingerprints[split]).write(part)

    for batch in results:
        buffered.append(batch)
        done += batch.num_rows
        if sum(b.num_rows for b in buffered) >= cfg.flush_rows:
            flush()
            seconds = time.perf_counter() - start
            log.info("prerank: %d / %d rows (%.1f rows/s)", done, pending.num_rows, done / max(seconds, 1e-9))
    if buffered:
        flush()
    log.info("prerank: %d rows in %.1f s", done, time.perf_counter() - start)


def _hit_rate(table: pa.Table) -> float | None:
    if table.num_rows == 0:
        return None
    hits = [t in c for t, c in zip(table.column("target").to_pylist(), table.column("candidates").to_pylist())]
    return float(np.mean(hits))


def compute_metrics(tables: dict[str, pa.Table], top_n: int) -> dict[str, Any]:
    """Test-row ranking metrics over the full catalogue, and target_in_candidates for every split."""
    test = tables["test"]
    metrics: dict[str, Any] = {}
    if test.num_rows:
        ranked = np.full((test.num_rows, top_n), -1, dtype=np.int64)
        for row, candidates in enumerate(test.column("candidates").to_pylist()):
            ranked[row, : len(candidates)] = candidates
        ranks = target_ranks(ranked, test.column("target").to_numpy())
        full = ranking_metrics(ranks, ks=(1, 5, 10))
        metrics = {"users": full["users"], **{k: full[k] for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10")}}
    metrics["target_in_candidates"] = _hit_rate(test)
    metrics["target_in_candidates_train"] = _hit_rate(tables["train"])
    metrics["target_in_candidates_valid"] = _hit_rate(tables["valid"])
    metrics["rows"] = {split: table.num_rows for split, table in tables.items()}
    return metrics


def splits_to_do(run_dir: RunDir, fingerprints: dict[str, dict], overwrite: bool) -> list[str]:
    """Splits without a finished file of this config; a finished file of another config is an error."""
    todo = []
    for split in SPLITS:
        previous = _fingerprint_of(run_dir, split)
        if overwrite or previous is None:
            todo.append(split)
        elif previous == fingerprints[split]:
            log.info("prerank: candidates/%s.parquet already written with this config; skipping", split)
        elif {k: v for k, v in previous.items() if k != "max_users"} == {
                k: v for k, v in fingerprints[split].items() if k != "max_users"}:
            # only the slice of users changed: redo this split, keep the others
            log.info("prerank: candidates/%s.parquet was written for max_users=%s; redoing it for %s", split,
                     previous.get("max_users"), fingerprints[split]["max_users"])
            todo.append(split)
        else:
            path = run_dir.path("candidates", f"{split}.parquet")
            raise config_mismatch("prerank", path, previous, fingerprints[split])
    return todo


def pending_rows(run_dir: RunDir, rows: dict[str, pa.Table], todo: list[str], fingerprints: dict) -> pa.Table:
    """(row_id, history, split) of the rows of `todo` splits that no earlier run finished."""
    pending = []
    for split in todo:
        table = rows[split]
        parts = _parts(run_dir, split, fingerprints[split]).read(["row_id", "candidates", "scores"])
        if parts is not None:
            table = table.filter(pc.invert(pc.is_in(table.column("row_id"), parts.column("row_id"))))
            log.info("prerank: %s: %d rows done by an earlier run, %d to go", split, parts.num_rows, table.num_rows)
        pending.append(table.select(["row_id", "history"]).append_column(
            "split", pa.array([split] * table.num_rows, pa.string())))
    schema = pa.schema([("row_id", pa.int64()), ("history", pa.list_(pa.int64())), ("split", pa.string())])
    return pa.concat_tables(pending) if pending else schema.empty_table()


def finish_split(run_dir: RunDir, split: str, rows: pa.Table, fingerprint: dict) -> None:
    """Join the split's rows with their results from the parts; write candidates/{split}.parquet."""
    parts = _parts(run_dir, split, fingerprint).read(["row_id", "candidates", "scores"])
    if parts is None:
        parts = pa.table({"row_id": pa.array([], pa.int64()), "candidates": pa.array([], pa.list_(pa.int64())),
                          "scores": pa.array([], pa.list_(pa.float32()))})
    found = parts.sort_by("row_id")
    if found.column("row_id").to_pylist() != rows.column("row_id").to_pylist():
        raise RuntimeError(f"prerank: {split}: results do not cover every row once; rerun to finish the missing ones")
    out = pa.table(
        {"user_id": rows.column("user_id"), "history": rows.column("history"), "target": rows.column("target"),
         "candidates": found.column("candidates"), "scores": found.column("scores")},
        schema=CANDIDATES_SCHEMA,
    ).replace_schema_metadata({META_KEY: json.dumps(fingerprint).encode()})
    run_dir.write_parquet(out, "candidates", f"{split}.parquet")


def run(cfg: PrerankConfig) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = RunDir.open(cfg.run_dir)
    model = cfg.model or run_dir.local_path("models", "midtrain")
    if not pafs.LocalFileSystem().get_file_info(f"{model}/config.json").is_file:
        raise FileNotFoundError(f"no model at {model} (config.json missing); run the midtrain stage first")
    fingerprints = split_fingerprints(cfg, model, run_dir)
    rows = build_rows(*(run_dir.read_parquet("data", f"{s}.parquet") for s in SPLITS), cfg)
    todo = splits_to_do(run_dir, fingerprints, cfg.overwrite)
    if cfg.overwrite and run_dir.exists("candidates", "_parts"):
        run_dir.fs.delete_dir(run_dir.path("candidates", "_parts"))
    pending = pending_rows(run_dir, rows, todo, fingerprints)
    if pending.num_rows:
        log.info("prerank: %d rows to pre-rank (%s) with %d %s actor(s)", pending.num_rows, ", ".join(todo),
                 cfg.actors, cfg.backend)
        run_search(cfg, run_dir, model, pending, fingerprints)
    for split in todo:
        finish_split(run_dir, split, rows[split], fingerprints[split])
    if todo and run_dir.exists("candidates", "_parts"):  # every split is final now; parts of other configs are stale
        run_dir.fs.delete_dir(run_dir.path("candidates", "_parts"))
    tables = {split: run_dir.read_parquet("candidates", f"{split}.parquet") for split in SPLITS}
    metrics = compute_metrics(tables, cfg.top_n)
    metrics.update(seconds=round(time.perf_counter() - started, 1), config=fingerprints["test"])
    run_dir.write_json(metrics, "prerank", "metrics.json")
    return metrics


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(PrerankConfig, __doc__, argv)
    metrics = run(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}))


if __name__ == "__main__":
    main()
