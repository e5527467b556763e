"""Stage `evaluate`: each model re-ranks the test lists; recall/NDCG, invalid answers and copying per model.

Reads `<run_dir>/candidates/{split}.parquet` (the pre-ranker's lists), `<run_dir>/data/items.parquet` and
`<run_dir>/sid/sid_map.parquet` (prompts), and the models named in `models`. Rows are the lists that hold their target
(`insert_missing_target` puts it into the others at a seeded position, exactly as the traces stage does; such rows
are marked and counted). A model is either `prerank` (the incoming order itself: nothing is generated) or a local
checkpoint; checkpoints run one after another, each on its own Ray Data actor pool of vLLM engines. Re-ranking is the
one implementation in rec/ (`PromptBuilder` -> `RerankGenerator` -> `parse_answer` -> `final_ranking`): an answer
that is not a permutation of the candidates falls back to the pre-rank order and is counted as invalid. A model entry
with `self_consistency: {orders: K}` re-ranks K orders of each list (the incoming one and K - 1 seeded shuffles) and
aggregates the answers by Borda count (rec.consistency). With `continuous: true` (the default) each actor runs vLLM's
async engine (`RerankStream`): every list is an engine request of its own and joins the running batch, with the lists
of the actor's other batches in flight (`concurrent_batches`), so a batch's longest answer does not hold the engine;
`continuous: false` is one blocking `LLM.generate` per batch (`RerankBatch`). Greedy answers are the same either way.

Writes `<run_dir>/eval/rows_<model>.parquet` (row_id, user_id, history, target, candidates, target_inserted, ranking,
valid, reason, generated_tokens, completion; the config in its Parquet metadata), `eval/metrics.json` (model ->
recall@1/3/5, ndcg@3/5/10, mrr, invalid_rate, identity_rate, invalid_reasons, mean_generated_tokens, rows, ...),
`eval/table.md` and `eval/metrics.png`. Resumable: finished rows are flushed to `eval/_parts/` every `flush_rows` rows
and a rerun skips them; a finished model is skipped by a rerun with the same config, another config is an error.

Local:    python -m pipelines.evaluate --config pipelines/configs/tiny/evaluate.yaml [max_rows=50]
Cluster:  ray job submit --working-dir . -- python -m pipelines.evaluate \\
              --config pipelines/configs/qwen3_8b/evaluate.yaml run_dir=/mnt/shared/gr2/beauty
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from pipelines.common import (
    Parts,
    StreamingActorsConfig,
    config_mismatch,
    exit_on_user_error,
    model_digest,
    parse_cli,
    start_reranker,
    stream_actor_pool,
)
from pipelines.lineage import stage_inputs
from pipelines.traces import eligible_rows
from rec.config import ConfigError, Section, config_fingerprint
from rec.consistency import AGGREGATES, candidate_orders
from rec.data import DataError
from rec.io import RunDir
from rec.metrics import ndcg_at_k, order_agreement, random_order_ndcg, ranking_metrics, target_ranks
from rec.rerank import RerankPromptSection, RerankSamplingSection, eos_token_id
from rec.rerank_settings import RerankSettings, check_lengths, load_model_settings, model_rerank_settings
from rec.sft_data import promoted_ranking

log = logging.getLogger("gr2.evaluate")

PRERANK = "prerank"
META_KEY = b"gr2_evaluate_config"
RESULT_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("ranking", pa.list_(pa.int64())), ("valid", pa.bool_()), ("reason", pa.string()),
    ("generated_tokens", pa.int64()), ("completion", pa.string()),
])
METRIC_KEYS = ("recall@1", "recall@3", "recall@5", "ndcg@3", "ndcg@5", "ndcg@10", "mrr")
# (metrics.json key, table.md column, decimals)
TABLE_COLUMNS = (("recall@1", "R@1", 4), ("recall@3", "R@3", 4), ("recall@5", "R@5", 4), ("ndcg@3", "N@3", 4),
                 ("ndcg@5", "N@5", 4), ("ndcg@10", "N@10", 4), ("invalid_rate", "invalid", 4),
                 ("identity_rate", "identity", 4), ("order_tau", "tau", 3), ("first_pick_ndcg@5", "pick N@5", 4),
                 ("mean_generated_tokens", "tokens", 1), ("rows", "rows", 0))
WRITERS = (("midtrain", "the midtrain stage"), ("sft", "the sft stage"), ("rl", "the rl stage"))


class SelfConsistencySection(Section):
    """Permutation self-consistency (rec.consistency): a model re-ranks several orders of each list, and the rankings
    become one."""

    orders: int = Field(default=1, ge=1)
    """Orders re-ranked per list: the incoming (pre-rank) order and `orders - 1` seeded shuffles (keyed by seed and
    row_id); 1 is off (one answer to the incoming order)."""
    aggregate: Literal["borda"] = "borda"
    """How the valid answers' rankings become the final one (rec.consistency.AGGREGATES): Borda count, ties by
    pre-rank position. A list whose every answer is invalid keeps the pre-rank order and counts as invalid."""


class ModelEntry(Section):
    """One model to evaluate."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Its row in metrics.json and table.md, and its file `eval/rows_<name>.parquet`."""
    path: str | None = None
    """`prerank` (or null with the name `prerank`): the pre-rank order itself. Otherwise a local checkpoint dir;
    a path not starting with `/` is under `model_root` (default: the run dir), e.g. `models/sft_reject`."""
    self_consistency: SelfConsistencySection = Field(default_factory=SelfConsistencySection)
    """Re-rank several orders of each list and aggregate (orders: 1, the default, is one answer per list); the
    identity rate is then that of the aggregated ranking."""

    @property
    def is_prerank(self) -> bool:
        return self.path == PRERANK or (self.path is None and self.name == PRERANK)

    def fingerprint(self) -> dict[str, Any]:
        """The entry as its rows file records it; self-consistency off is left out, as before the option existed."""
        entry = self.model_dump(mode="json")
        if self.self_consistency.orders == 1:
            del entry["self_consistency"]
        return entry


class EvaluateConfig(StreamingActorsConfig):
    models: list[ModelEntry] = Field(min_length=1)
    """Models to compare, in table order; each checkpoint runs on its own actor pool, one after another."""
    model_root: str | None = None
    """Directory that relative model paths are under; null is the run dir (which must then be a local path). With an
    s3:// or gs:// run_dir, point it at the checkpoints copied onto a mount every pod sees."""
    split: Literal["train", "valid", "test"] = "test"
    """Rows from `candidates/{split}.parquet`."""
    max_rows: int | None = Field(default=None, ge=0)
    """The first N eligible rows; null takes all."""
    insert_missing_target: bool = False
    """Lists without the target get it at a seeded position (pipelines.traces.eligible_rows), marked and counted;
    false leaves those rows out."""
    prompt: RerankPromptSection = Field(default_factory=RerankPromptSection)
    """Prompt settings for models without a `gr2_rerank.json`; a model dir that has one (the SFT stage writes it)
    is prompted exactly as it was trained."""
    sampling: RerankSamplingSection = Field(default_factory=lambda: RerankSamplingSection(temperature=0.0))
    """Greedy by default; unconstrained by default, so the table measures whether a model learned the format."""
    eos_token: str = "<|im_end|>"
    """Token that ends the answer (Qwen chat format), unless the model's `gr2_rerank.json` names another."""
    overwrite: bool = False
    """Redo every model from scratch (otherwise finished models are kept, and a different config is an error)."""

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        for m in self.models:
            if m.path is None and not m.is_prerank:
                raise ValueError(f"model {m.name!r} has no path: give a checkpoint dir, or path: {PRERANK}")
            if m.is_prerank and m.self_consistency.orders > 1:
                raise ValueError(f"model {m.name!r} is the pre-rank order: it has no answers to aggregate, drop its "
                                 "self_consistency")
        return self


def writer_of(path: str) -> str:
    """Which stage publishes a checkpoint dir like `path` (for the missing-model error).

    >>> writer_of("runs/tiny/models/sft_reject"), writer_of("/mnt/ckpt/qwen")
    ('the sft stage', 'the stage that trains it')
    """
    base = Path(path).name
    return next((stage for prefix, stage in WRITERS if base.startswith(prefix)), "the stage that trains it")


def resolve_model(run_dir: RunDir, entry: ModelEntry, model_root: str | None = None) -> str | None:
    """The local checkpoint dir of `entry`, or None for the pre-rank order; a missing checkpoint is an error."""
    if entry.is_prerank:
        return None
    path = entry.path
    if not path.startswith("/"):
        if model_root is not None:
            path = f"{model_root.rstrip('/')}/{path}"
        else:
            try:
                path = run_dir.local_path(*path.split("/"))
            except ValueError:
                raise ConfigError(f"model {entry.name!r}: relative path {path!r} needs a local run_dir; set model_root "
                                  "to where the checkpoints are mounted, or give an absolute path") from None
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"model {entry.name!r}: no checkpoint at {path} (config.json missing); "
                                f"{writer_of(path)} writes it: run it first, or remove {entry.name!r} from models")
    return str(Path(path).resolve())


def rerank_settings(model: str, cfg: EvaluateConfig) -> tuple[RerankPromptSection, str]:
    """(prompt section, eos token) for `model`: its own `gr2_rerank.json` when it has one, else the config's."""
    return model_rerank_settings(model, cfg.prompt, cfg.eos_token)


def check_model_lengths(cfg: EvaluateConfig, models: dict[str, str | None]) -> dict[str, RerankSettings]:
    """Every checkpoint's settings, checked against this config before any engine starts: a config that allows fewer
    answer tokens than a model was trained to write (its gr2_rerank.json `lengths`), or an engine too short for the
    prompt + answer, is refused with one ConfigError naming both fields of every contradiction."""
    where = {name: f"evaluate (model {name!r})" for name in models}
    settings = {name: load_model_settings(path, cfg.prompt, cfg.eos_token, config=where[name])
                for name, path in models.items() if path}
    problems = [problem for name, found in settings.items()
                for problem in check_lengths(found, cfg.sampling, cfg.engine.max_model_len, where[name])]
    if problems:
        raise ConfigError("evaluate: the config contradicts the models' lengths:\n  " + "\n  ".join(problems))
    return settings


def rerank_rows(reranker, batch: pa.Table, consistency: SelfConsistencySection | None = None, seed: int = 0
                ) -> pa.Table:
    """One greedy (or sampled) answer per row -> final ranking (`rec.engines.reranker.Reranker`: a prompt too long for the
    engine is not sent and falls back like an invalid answer, with the reason `prompt_too_long`).

    With `consistency.orders` K > 1 the reranker answers K orders of each row's list (`candidate_orders`, seeded by
    `seed` and the row id; all K x rows in one call); the valid answers' rankings are aggregated (Borda), the row is
    invalid only when every answer is (reason: the first answer's), `generated_tokens` sums the K answers and
    `completion` holds them as a JSON list."""
    consistency = consistency or SelfConsistencySection()
    histories, shown = rerank_inputs(batch, consistency, seed)
    return rows_result(batch, reranker.rerank(histories, shown), consistency)


async def rerank_rows_async(reranker, batch: pa.Table, consistency: SelfConsistencySection | None = None,
                            seed: int = 0) -> pa.Table:
    """`rerank_rows` on an `rec.engines.async_reranker.AsyncReranker`: every list (every order of it) is an engine
    request of its own, all in the engine's running batch together."""
    consistency = consistency or SelfConsistencySection()
    histories, shown = rerank_inputs(batch, consistency, seed)
    return rows_result(batch, await reranker.rerank_many(histories, shown), consistency)


def rerank_inputs(batch: pa.Table, consistency: SelfConsistencySection, seed: int
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """(histories, candidate lists as shown) of a batch: each row's list in `consistency.orders` orders."""
    k = consistency.orders
    shown = [order for items, row_id in zip(batch.column("candidates").to_pylist(), batch.column("row_id").to_pylist())
             for order in candidate_orders(items, k, seed, row_id)]
    histories = [history for history in batch.column("history").to_pylist() for _ in range(k)]
    return histories, shown


def rows_result(batch: pa.Table, results: list, consistency: SelfConsistencySection) -> pa.Table:
    """The batch's result rows from its answers (`rerank_inputs` order)."""
    k = consistency.orders
    lists = batch.column("candidates").to_pylist()
    rankings, reasons, tokens, completions = [], [], [], []
    for row, items in enumerate(lists):
        answers = results[row * k:(row + 1) * k]
        if k == 1:
            rankings.append(answers[0].ranking)
            reasons.append(answers[0].reason)
            completions.append(answers[0].completion)
        else:
            valid = [a.ranking for a in answers if a.reason is None]
            rankings.append(AGGREGATES[consistency.aggregate](valid, items) if valid else list(items))
            reasons.append(None if valid else answers[0].reason)
            completions.append(json.dumps([a.completion for a in answers], ensure_ascii=False))
        tokens.append(sum(a.generated_tokens for a in answers))
    return pa.table({"row_id": batch.column("row_id"), "ranking": rankings, "valid": [r is None for r in reasons],
                     "reason": reasons, "generated_tokens": tokens, "completion": completions}, schema=RESULT_SCHEMA)


class RerankBatch:
    """Ray Data actor: candidate rows -> one model's final rankings; one engine per actor, built once (`start`: the
    blocking vLLM engine here, the async one in `RerankStream`)."""

    continuous = False

    def __init__(self, run_dir: str, model: str, prompt: dict[str, Any], eos_token: str, cfg: dict[str, Any],
                 consistency: dict[str, Any] | None = None):
        from pipelines.common import setup_logging, start_async_reranker

        setup_logging()
        cfg = EvaluateConfig.model_validate(cfg)
        self.seed = cfg.seed
        self.consistency = SelfConsistencySection.model_validate(consistency or {})
        start = start_async_reranker if self.continuous else start_reranker
        self.reranker, bound, self._core_lock = start(
            RunDir.open(run_dir), model, RerankPromptSection.model_validate(prompt), eos_token, cfg.sampling,
            cfg.engine, cfg.cpus_per_actor, cfg.gpus_per_actor, cfg.bind_cores, seed=cfg.seed)
        log.info("evaluate actor%s: %s on cores %s", " (continuous)" if self.continuous else "", model, bound or "-")

    def __call__(self, batch: pa.Table) -> pa.Table:
        return rerank_rows(self.reranker, batch, self.consistency, self.seed)


class RerankStream(RerankBatch):
    """Ray Data actor, continuous batching: candidate rows -> one model's final rankings on vLLM's async engine, every
    list an engine request of its own, in the running batch with the lists of this actor's other batches in flight
    (`concurrent_batches`)."""

    continuous = True

    async def __call__(self, batch: pa.Table) -> pa.Table:
        return await rerank_rows_async(self.reranker, batch, self.consistency, self.seed)


def prerank_results(rows: pa.Table) -> pa.Table:
    """The pre-rank order as a model's answers: all valid, all equal to the incoming order, nothing generated."""
    n = rows.num_rows
    return pa.table({"row_id": rows.column("row_id"), "ranking": rows.column("candidates"), "valid": [True] * n,
                     "reason": pa.nulls(n, pa.string()), "generated_tokens": [0] * n,
                     "completion": pa.nulls(n, pa.string())}, schema=RESULT_SCHEMA)


def table_digest(table: pa.Table) -> str:
    """Content digest of the candidate lists: a rerun of the prerank stage changes it, and with it the fingerprint."""
    table = table.select(["history", "target", "candidates"]).replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def fingerprints(cfg: EvaluateConfig, entry: ModelEntry, model: str | None, prompt: RerankPromptSection, eos: str,
                 candidates_digest: str) -> tuple[dict, dict]:
    """(of the model's finished file, of its parts): per model, so adding a model keeps the finished ones; the parts
    survive a change of max_rows (rows are independent)."""
    final = config_fingerprint(cfg, exclude=EvaluateConfig.RESOURCE_FIELDS | {"models", "model_root", "prompt",
                                                                             "eos_token"})
    final["engine"].pop("kv_cache_memory_bytes", None)
    final.update(model=entry.fingerprint(), candidates_digest=candidates_digest)
    if model is None:  # the pre-rank order: no engine, no prompt
        del final["engine"], final["sampling"]
    else:
        final.update(prompt=prompt.model_dump(mode="json"), eos_token=eos, model_digest=model_digest(model))
    return final, {k: v for k, v in final.items() if k != "max_rows"}


def finished_fingerprint(run_dir: RunDir, name: str) -> dict | None:
    return run_dir.parquet_json_metadata(META_KEY, "eval", f"rows_{name}.parquet")


def generate(cfg: EvaluateConfig, entry: ModelEntry, model: str, prompt: RerankPromptSection, eos: str,
             pending: pa.Table, parts: Parts) -> None:
    """Re-rank `pending` rows with one model on its own actor pool, flushing results to `parts`."""
    name = entry.name
    started, done, invalid, buffered = time.perf_counter(), 0, 0, []
    batches = stream_actor_pool(cfg, pending, RerankStream if cfg.continuous else RerankBatch, {
        "run_dir": cfg.run_dir, "model": model, "prompt": prompt.model_dump(mode="json"), "eos_token": eos,
        "cfg": cfg.model_dump(mode="json"), "consistency": entry.self_consistency.model_dump(mode="json")})
    for batch in batches:
        buffered.append(batch)
        done += batch.num_rows
        invalid += batch.num_rows - (pc.sum(batch.column("valid")).as_py() or 0)
        if sum(b.num_rows for b in buffered) >= cfg.flush_rows:
            parts.write(pa.concat_tables(buffered))
            buffered.clear()
        log.info("evaluate (%s): %d / %d rows, %d invalid (%.1f rows/s)", name, done, pending.num_rows, invalid,
                 done / max(time.perf_counter() - started, 1e-9))
    if buffered:
        parts.write(pa.concat_tables(buffered))


def evaluate_model(cfg: EvaluateConfig, run_dir: RunDir, entry: ModelEntry, model: str | None,
                   settings: tuple[RerankPromptSection, str], rows: pa.Table, final_fp: dict, parts_fp: dict) -> None:
    """Re-rank `rows` with one model (rows in its parts are kept) and write `eval/rows_<name>.parquet`."""
    name = entry.name
    if model is None:
        results = prerank_results(rows)
    else:
        parts = Parts(run_dir, "eval", name, parts_fp)
        done = parts.read(["row_id"])
        pending = rows if done is None else rows.filter(pc.invert(pc.is_in(rows.column("row_id"),
                                                                          done.column("row_id"))))
        log.info("evaluate (%s): %d rows, %d done by an earlier run; %s", name, rows.num_rows,
                 rows.num_rows - pending.num_rows, model)
        if pending.num_rows:
            generate(cfg, entry, model, *settings, pending.select(["row_id", "history", "candidates", "target"]),
                     parts)
        results = parts.read()
        results = results.filter(pc.is_in(results.column("row_id"), rows.column("row_id"))).sort_by("row_id")
        if results.column("row_id").to_pylist() != rows.column("row_id").to_pylist():
            raise RuntimeError(f"evaluate ({name}): results do not cover every row exactly once; rerun to finish")
    table = rows
    for column in RESULT_SCHEMA.names[1:]:
        table = table.append_column(RESULT_SCHEMA.field(column), results.column(column))
    table = table.replace_schema_metadata({META_KEY: json.dumps(final_fp).encode()})
    run_dir.write_parquet(table, "eval", f"rows_{name}.parquet")


def model_metrics(table: pa.Table) -> dict[str, Any]:
    """Metrics of one model's rows (target, candidates, ranking, valid, reason, generated_tokens, target_inserted).

    `identity_rate` counts only VALID answers equal to the incoming order (over all rows): an invalid answer also
    ends in the incoming order, but by fallback, and is counted in `invalid_rate` instead.

    Diagnostics of how a model moves the list: `order_tau`, the mean Kendall tau of the valid answers against the
    incoming order (1 keeps it, ~0 unrelated; None without a valid answer); `first_pick_ndcg@5`, the NDCG@5 the
    incoming order would score with only the final ranking's first item moved to the front (the model's choice of
    the next item, with the rest of the order kept); `random_order_ndcg@5`, what a random order of the same lists
    scores in expectation.
    """
    rankings = table.column("ranking").to_pylist()
    ranked = np.full((len(rankings), max(map(len, rankings), default=1)), -1, dtype=np.int64)
    for row, ranking in enumerate(rankings):
        ranked[row, : len(ranking)] = ranking
    full = ranking_metrics(target_ranks(ranked, table.column("target").to_numpy()), ks=(1, 3, 5, 10))
    valid = np.asarray(table.column("valid").to_pylist(), dtype=bool)
    incoming = table.column("candidates").to_pylist()
    identity = np.array([r == c for r, c in zip(rankings, incoming)], dtype=bool)
    reasons = Counter(r for r in table.column("reason").to_pylist() if r is not None)
    taus = [order_agreement(r, c) for r, c, v in zip(rankings, incoming, valid) if v]
    targets = table.column("target").to_numpy()
    # an invalid answer has no pick: its row keeps the incoming order (as its final ranking does)
    first_picks = [promoted_ranking(c, r[0]) if v else list(c) for r, c, v in zip(rankings, incoming, valid)]
    picked = np.full_like(ranked, -1)
    for row, ranking in enumerate(first_picks):
        picked[row, : len(ranking)] = ranking
    return {
        **{key: full[key] for key in METRIC_KEYS},
        "invalid_rate": float(np.mean(~valid)),
        "identity_rate": float(np.mean(valid & identity)),
        "order_tau": float(np.mean(taus)) if taus else None,
        "first_pick_ndcg@5": ndcg_at_k(target_ranks(picked, targets), 5),
        "random_order_ndcg@5": random_order_ndcg(np.array([len(c) for c in incoming]), 5),
        "invalid_reasons": dict(sorted(reasons.items())),
        "mean_generated_tokens": float(np.mean(table.column("generated_tokens").to_numpy())),
        "rows": table.num_rows,
        "target_inserted_rows": int(pc.sum(table.column("target_inserted")).as_py() or 0),
    }


def markdown_table(cfg: EvaluateConfig, metrics: dict[str, dict], dropped: dict[str, int], command: str) -> str:
    """table.md: one row per model, how the rows were chosen, and what produced it."""
    header = "| model | " + " | ".join(column for _, column, _ in TABLE_COLUMNS) + " |"
    lines = [f"## Re-ranking evaluation: {cfg.split} split", "", header,
             "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for name, values in metrics.items():
        cells = ["-" if values[key] is None else f"{values[key]:.{decimals}f}" if decimals else str(values[key])
                 for key, _, decimals in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = next(iter(metrics.values()))["rows"]
    inserted = dropped["rows_target_inserted"]
    lines += ["", f"Rows: {rows} lists of candidates/{cfg.split}.parquet that hold their target"
                  + (f" (max_rows {cfg.max_rows})" if cfg.max_rows is not None else "")
                  + f"; target inserted into {inserted} of {rows} lists (seeded positions)"
                  + (f"; {dropped['rows_without_target']} lists without it left out." if not cfg.insert_missing_target
                     else "."),
              "Invalid answers fall back to the pre-rank order and count in `invalid`; `identity` = valid answers "
              "equal to the pre-rank order / rows; `tau` = mean Kendall tau of the valid answers against the "
              "pre-rank order; `pick N@5` = N@5 of the pre-rank order with only the model's first item moved to the "
              f"front; a random order of these lists scores N@5 {next(iter(metrics.values()))['random_order_ndcg@5']:.4f} "
              "in expectation; `tokens` = mean generated tokens per row.",
              f"Command: `{command}`",
              "Config: `" + json.dumps(cfg.model_dump(mode="json", exclude={"overwrite"}), sort_keys=True) + "`", ""]
    return "\n".join(lines)


def plot(metrics: dict[str, dict], title: str) -> bytes:
    """metrics.png: grouped bars of R@1, R@5 and N@5 per model."""
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas renders the PNG

    shown = (("recall@1", "R@1"), ("recall@5", "R@5"), ("ndcg@5", "N@5"))
    names = list(metrics)
    fig = Figure(figsize=(max(5.0, 1.6 * len(names) + 2), 4), dpi=100)
    ax = fig.subplots()
    width = 0.8 / len(shown)
    for i, (key, label) in enumerate(shown):
        xs = np.arange(len(names)) + (i - (len(shown) - 1) / 2) * width
        bars = ax.bar(xs, [metrics[n][key] for n in names], width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("model")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def run(cfg: EvaluateConfig, command: str | None = None) -> dict[str, Any]:
    """Evaluate every model of `cfg` (skipping finished ones); returns metrics, the Markdown table and what was
    skipped."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    run_dir = RunDir.open(cfg.run_dir)
    # every model is checked before any work, so a typo in the last one does not cost the first ones' runs
    models = {m.name: resolve_model(run_dir, m, cfg.model_root) for m in cfg.models}
    checked = check_model_lengths(cfg, models)
    settings = {name: (checked[name].prompt, checked[name].eos_token) if path else (cfg.prompt, cfg.eos_token)
                for name, path in models.items()}
    candidates = run_dir.read_parquet("candidates", f"{cfg.split}.parquet")
    rows, dropped = eligible_rows(candidates, cfg)
    if not rows.num_rows:
        raise DataError(f"{run_dir.path('candidates', f'{cfg.split}.parquet')}: no row holds its target "
                        f"({dropped['rows_without_target']} rows); set insert_missing_target=true to evaluate anyway")
    digest = table_digest(candidates)
    inputs = stage_inputs(run_dir, "evaluate")
    plans, skipped = [], []
    for entry in cfg.models:
        final_fp, parts_fp = fingerprints(cfg, entry, models[entry.name], *settings[entry.name], digest)
        final_fp["inputs"] = parts_fp["inputs"] = inputs
        previous = finished_fingerprint(run_dir, entry.name)
        if previous is not None and not cfg.overwrite:
            if previous != final_fp:
                raise config_mismatch("evaluate", run_dir.path("eval", f"rows_{entry.name}.parquet"), previous,
                                      final_fp)
            log.info("evaluate: eval/rows_%s.parquet already written with this config; skipping", entry.name)
            skipped.append(entry.name)
            continue
        if (model := models[entry.name]) is not None:  # a wrong eos token fails here, not in every actor
            eos_token_id(AutoTokenizer.from_pretrained(model), settings[entry.name][1], model)
        plans.append((entry, final_fp, parts_fp))
    if cfg.overwrite and run_dir.exists("eval", "_parts"):
        run_dir.fs.delete_dir(run_dir.path("eval", "_parts"))
    for entry, final_fp, parts_fp in plans:
        evaluate_model(cfg, run_dir, entry, models[entry.name], settings[entry.name], rows, final_fp, parts_fp)
    if plans and run_dir.exists("eval", "_parts"):  # every model is final now; parts of other configs are stale
        run_dir.fs.delete_dir(run_dir.path("eval", "_parts"))
    metrics = {m.name: model_metrics(run_dir.read_parquet("eval", f"rows_{m.name}.parquet")) for m in cfg.models}
    table_md = markdown_table(cfg, metrics, dropped, command or "pipelines.evaluate.run(cfg)")
    run_dir.write_json(metrics, "eval", "metrics.json")
    run_dir.write_bytes(table_md.encode(), "eval", "table.md")
    run_dir.write_bytes(plot(metrics, f"Re-ranking, {cfg.split} split ({rows.num_rows} rows)"), "eval", "metrics.png")
    return {"metrics": metrics, "table": table_md, "skipped": skipped,
            "seconds": round(time.perf_counter() - started, 2)}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(EvaluateConfig, __doc__, argv)
    args = sys.argv[1:] if argv is None else argv
    result = run(cfg, command=shlex.join(["python", "-m", "pipelines.evaluate", *args]))
    print(result["table"])


if __name__ == "__main__":
    main()
