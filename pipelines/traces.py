"""Stage `traces`: a teacher LLM writes reasoning traces for the re-ranker, by target or reject sampling.

Reads `<run_dir>/candidates/train.parquet` (the pre-ranker's lists), `<run_dir>/data/items.parquet` (titles),
`<run_dir>/sid/sid_map.parquet` and the teacher (`teacher.model`, or `<run_dir>/models/midtrain`). Rows are the
training lists that hold their target (`insert_missing_target` puts it into the others at a seeded position;
such rows are marked). The teacher is a vLLM engine in each actor of a Ray Data actor pool (CPU actors bound to
cores of their own; GPU actors with tensor parallelism from `engine.extra`).

Batching (`continuous`, default true): each actor runs vLLM's async engine (`TeacherStream`, an async Ray Data
actor with `concurrent_batches` batches in flight); every row runs its own rounds, and its next round is sent the
moment its previous samples are back, into the engine's running batch, so neither a batch's longest answer nor the
shrinking later rounds leave the engine idle. `continuous=false` is the static path (`TeacherBatch`: one blocking
`LLM.generate` per batch and round), kept for comparison (`bench/traces_throughput.py`). Why async actors in Ray
Data and not `ray.data.llm`'s processor: a reject round is `n` samples of one prompt whose acceptance decides
whether the row needs another round, i.e. a per-row loop around the engine, while `ray.data.llm` maps one request
per row to one answer (it returns only the first of `n` completions) and needs an explicit CPU placement group on
CPU; the async actor keeps the ranking logits processor, the per-request constraint arguments and the same code on
CPU and GPU (the engine core is a child process in both).

- `mode=target`: one sample per row; the prompt also names the true next item (post-hoc rationale).
- `mode=reject`: rounds; every unresolved row gets `samples_per_round` samples in one request per round (the
  prompt is computed once and shared), the first valid sample whose top-ranked item is the target is accepted,
  the others go to the next round until `max_attempts` samples were spent.
In both modes a row is accepted when its answer parses into a permutation of the candidates with the target
first (rec.rerank.parse_answer); `sampling.constrained` decodes answers under rec.answer_constraint, so every
sample parses and sampling only decides the order. An answer that does not parse is counted, never fatal.

Writes `<run_dir>/traces/{mode}.parquet` (row_id, user_id, history, target, candidates, prompt, completion,
ranking, valid, accepted, attempts, rounds, tokens, ...) and `<run_dir>/traces/stats.json` (acceptance overall
and by round, attempts mean/p90, generated tokens per accepted trace, rows/s; also kept as
`traces/stats_{mode}.json`). Resumable: finished rows are flushed to `traces/_parts/` every `flush_rows` rows and a
rerun skips them; a finished mode is skipped by a rerun with the same config.

Local:    python -m pipelines.traces --config pipelines/configs/tiny/traces.yaml [mode=target max_rows=50]
Cluster:  ray job submit --working-dir . -- python -m pipelines.traces \\
              --config pipelines/configs/qwen3_8b/traces.yaml run_dir=/mnt/shared/gr2/beauty
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pydantic import Field, model_validator

from pipelines.common import (
    Parts,
    StreamingActorsConfig,
    config_mismatch,
    exit_on_user_error,
    model_digest,
    parse_cli,
    start_actor_engine,
    stream_actor_pool,
)
from pipelines.lineage import stage_inputs
from rec.config import Section, config_fingerprint
from rec.io import RunDir
from rec.rerank import RerankPromptSection, RerankSamplingSection

log = logging.getLogger("gr2.traces")

META_KEY = b"gr2_traces_config"
ROWS_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("user_id", pa.int64()), ("history", pa.list_(pa.int64())), ("target", pa.int64()),
    ("candidates", pa.list_(pa.int64())), ("target_inserted", pa.bool_()),
])
RESULT_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("prompt", pa.string()), ("completion", pa.string()), ("ranking", pa.list_(pa.int64())),
    ("valid", pa.bool_()), ("accepted", pa.bool_()), ("attempts", pa.int32()), ("rounds", pa.int32()),
    ("accepted_round", pa.int32()), ("prompt_tokens", pa.int32()), ("request_prompt_tokens", pa.int64()),
    ("generated_tokens", pa.int64()), ("invalid_samples", pa.int32()), ("invalid_reasons", pa.string()),
    ("run_id", pa.string()),
])


class TeacherSection(Section):
    model: str | None = None
    """Teacher checkpoint: a local path or hub id; null is `<run_dir>/models/midtrain` (the tiny preset)."""
    eos_token: str = "<|im_end|>"
    """Token that ends the teacher's turn (Qwen chat format)."""


class TracesConfig(StreamingActorsConfig):
    mode: Literal["target", "reject"] = "reject"
    """target: one pass with the true item in the prompt; reject: sample until the teacher ranks it first."""
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    backend: Literal["vllm", "hf"] = "vllm"
    """vLLM engines, or a plain loop over HF `generate` per row (the reference and the benchmark baseline; always
    static, whatever `continuous` says)."""
    sampling: RerankSamplingSection = Field(default_factory=RerankSamplingSection)
    prompt: RerankPromptSection = Field(default_factory=RerankPromptSection)
    samples_per_round: int = Field(default=4, ge=1)
    """Reject mode: samples per unresolved row and round, in one request (n)."""
    max_attempts: int = Field(default=8, ge=1)
    """Reject mode: samples a row may spend in all before it counts as exhausted."""
    pin_target_first: bool = False
    """Target mode only (ignored in reject mode), with constrained answers: the ranking must start with the target,
    as a teacher told the answer writes it (a tiny teacher does not follow that instruction by itself; the rest of
    the ranking and the explanation stay its own)."""
    max_rows: int | None = Field(default=None, ge=0)
    """The first N eligible training rows; null takes all."""
    insert_missing_target: bool = False
    """Rows whose list lacks the target get it at a seeded position (replacing that candidate), marked
    `target_inserted`; false drops them (counted in stats)."""
    overwrite: bool = False
    """Redo this mode from scratch (otherwise finished rows are kept, and a different config is an error)."""

    @model_validator(mode="after")
    def _check(self) -> TracesConfig:
        if self.pin_target_first and not self.sampling.constrained:
            raise ValueError("pin_target_first needs sampling.constrained=true (the pin is part of the constraint)")
        if self.mode == "reject" and self.samples_per_round > self.max_attempts:
            raise ValueError(f"samples_per_round ({self.samples_per_round}) must be <= max_attempts "
                             f"({self.max_attempts})")
        return self

    def samples_in_round(self, spent: int) -> int:
        """Samples a row gets in its next round, having spent `spent`."""
        if self.mode == "target":
            return 1
        return min(self.samples_per_round, self.max_attempts - spent)

    @property
    def attempt_budget(self) -> int:
        return 1 if self.mode == "target" else self.max_attempts


class RowSelection(Protocol):
    """What eligible_rows reads of a stage config (traces and evaluate both have these fields)."""

    seed: int
    max_rows: int | None
    insert_missing_target: bool


def eligible_rows(candidates: pa.Table, cfg: RowSelection) -> tuple[pa.Table, dict[str, int]]:
    """Candidate rows that hold their target (row_id = position in the candidates file), with the target inserted
    into the others when asked, and how many were dropped or filled."""
    rng_seed = cfg.seed
    out: dict[str, list] = {name: [] for name in ROWS_SCHEMA.names}
    counts = Counter()
    columns = [candidates.column(c).to_pylist() for c in ("user_id", "history", "target", "candidates")]
    for row_id, (user, history, target, listed) in enumerate(zip(*columns)):
        if cfg.max_rows is not None and len(out["row_id"]) >= cfg.max_rows:
            break
        inserted = target not in listed
        if inserted:
            if not cfg.insert_missing_target or not listed:
                counts["rows_without_target"] += 1
                continue
            position = int(np.random.default_rng([rng_seed, row_id]).integers(len(listed)))
            listed = listed[:position] + [target] + listed[position + 1:]
            counts["rows_target_inserted"] += 1
        for name, value in zip(ROWS_SCHEMA.names, (row_id, user, history, target, listed, inserted)):
            out[name].append(value)
    return pa.table(out, schema=ROWS_SCHEMA), {"rows_without_target": counts["rows_without_target"],
                                               "rows_target_inserted": counts["rows_target_inserted"]}


@dataclass
class RowState:
    """One row's progress through the rounds inside an actor."""

    row_id: int
    prompt: str
    prompt_ids: list[int]
    candidate_sids: list[str]
    candidates: list[int]
    target_position: int
    attempts: int = 0
    rounds: int = 0
    accepted_round: int = 0
    completion: str = ""
    ranking: list[int] = field(default_factory=list)
    valid: bool = False
    request_prompt_tokens: int = 0
    """Prompt tokens sent: the prompt once per round (its n samples share it), i.e. rounds x prompt length."""
    generated_tokens: int = 0
    reasons: Counter = field(default_factory=Counter)
    candidate_token_ids: list[list[int]] = field(default_factory=list)

    def take(self, text: str, parsed, round_number: int) -> None:
        """Record one sample: the first accepted one wins; before that, a valid one beats an invalid one."""
        if self.accepted_round:
            return
        if not parsed.valid:
            self.reasons[parsed.reason] += 1
            if not self.valid:
                self.completion = text
            return
        ranking = [self.candidates[p] for p in parsed.ranking]
        if parsed.ranking[0] == self.target_position:
            self.accepted_round = round_number
        self.completion, self.ranking, self.valid = text, ranking, True


class Teacher:
    """What both teacher actors do around their engine: rows -> prompts, samples -> accepted traces -> results."""

    cfg: TracesConfig

    def _setup(self, cfg: dict[str, Any]) -> None:
        from pipelines.common import setup_logging

        setup_logging()
        self.cfg = TracesConfig.model_validate(cfg)
        self.run_id = uuid.uuid4().hex[:12]  # marks the rows this actor wrote (a resumed run keeps earlier ones)

    def _rows(self, batch: pa.Table) -> tuple[list[RowState], list[RowState]]:
        """(every row of the batch, the rows to sample: a prompt + answer over the engine's length is counted as
        `prompt_too_long` and never sent)."""
        columns = [batch.column(c).to_pylist() for c in ("row_id", "history", "candidates", "target")]
        rows = []
        for row_id, history, candidates, target in zip(*columns):
            prompt, prompt_ids = self.prompts.prompt(history, candidates,
                                                     target if self.cfg.mode == "target" else None)
            rows.append(RowState(row_id, prompt, prompt_ids, self.prompts.candidate_sids(candidates), candidates,
                                 candidates.index(target),
                                 candidate_token_ids=self.prompts.candidate_token_ids(candidates)))
        pending = []
        for row in rows:
            if len(row.prompt_ids) + self.decoding.max_tokens(row.candidate_token_ids) > self.cfg.engine.max_model_len:
                row.reasons["prompt_too_long"] += 1
                row.attempts = self.cfg.attempt_budget
            else:
                pending.append(row)
        return rows, pending

    def _request(self, row: RowState) -> dict[str, Any]:
        """The engine request of `row`'s next round: its samples, and the pinned first candidate (target mode)."""
        pin = self.cfg.pin_target_first and self.cfg.mode == "target"
        return {"n": self.cfg.samples_in_round(row.attempts), "first": row.target_position if pin else None}

    def _record(self, row: RowState, samples: list[tuple[str, int]], round_number: int) -> bool:
        """Take one round's samples; True while the row needs another round."""
        from rec.rerank import parse_answer

        row.rounds += 1
        row.request_prompt_tokens += len(row.prompt_ids)
        for text, generated in samples:
            row.attempts += 1
            row.generated_tokens += generated
            prompt = self.cfg.prompt
            row.take(text, parse_answer(text, row.candidate_sids, prompt.answer, prompt.answer_top), round_number)
        return not row.accepted_round and row.attempts < self.cfg.attempt_budget

    def _result(self, rows: list[RowState]) -> pa.Table:
        return pa.table({
            "row_id": [r.row_id for r in rows], "prompt": [r.prompt for r in rows],
            "completion": [r.completion for r in rows], "ranking": [r.ranking for r in rows],
            "valid": [r.valid for r in rows], "accepted": [bool(r.accepted_round) for r in rows],
            "attempts": [r.attempts for r in rows], "rounds": [r.rounds for r in rows],
            "accepted_round": [r.accepted_round for r in rows], "prompt_tokens": [len(r.prompt_ids) for r in rows],
            "request_prompt_tokens": [r.request_prompt_tokens for r in rows],
            "generated_tokens": [r.generated_tokens for r in rows],
            "invalid_samples": [sum(r.reasons.values()) for r in rows],
            "invalid_reasons": [json.dumps(dict(r.reasons), sort_keys=True) for r in rows],
            "run_id": [self.run_id] * len(rows),
        }, schema=RESULT_SCHEMA)


class TeacherBatch(Teacher):
    """Ray Data actor, static batching: candidate rows -> traces, all rounds of a batch inside one call, each round
    one blocking `LLM.generate` over the batch's unresolved rows; one engine per actor (or HF `generate`)."""

    def __init__(self, run_dir: str, model: str, cfg: dict[str, Any]):
        from transformers import AutoTokenizer

        from rec.engines.reranker import RANKING_PROCESSOR, RerankGenerator
        from rec.rerank import PromptBuilder, eos_token_id

        self._setup(cfg)
        cfg = self.cfg
        tokenizer = AutoTokenizer.from_pretrained(model)
        self.prompts = PromptBuilder.for_run(tokenizer, RunDir.open(run_dir), cfg.prompt)
        eos_id = eos_token_id(tokenizer, cfg.teacher.eos_token, model)
        if cfg.backend == "hf":
            import torch

            from rec.model import load_student

            torch.manual_seed(cfg.seed)
            torch.set_num_threads(max(1, round(cfg.cpus_per_actor)))
            hf_model = load_student(model, dtype=getattr(torch, cfg.engine.dtype))[1].eval()
            self.generator = self.decoding = RerankGenerator(tokenizer, eos_id, cfg.sampling, model=hf_model,
                                                               answer=cfg.prompt.answer, top=cfg.prompt.answer_top)
            log.info("traces: HF teacher %s", model)
            return
        processors = [RANKING_PROCESSOR] if cfg.sampling.constrained else []
        llm, bound, self._core_lock = start_actor_engine(cfg, model, logits_processors=processors, seed=cfg.seed)
        self.generator = self.decoding = RerankGenerator(tokenizer, eos_id, cfg.sampling, llm=llm,
                                                               answer=cfg.prompt.answer, top=cfg.prompt.answer_top)
        log.info("traces actor: teacher %s on cores %s", model, bound or "-")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, pending = self._rows(batch)
        round_number = 0
        while pending:
            round_number += 1
            requests = [self._request(r) for r in pending]
            outputs = self.generator.generate(
                [r.prompt_ids for r in pending], [r.candidate_token_ids for r in pending],
                [q["n"] for q in requests], first=[q["first"] for q in requests])
            pending = [row for row, samples in zip(pending, outputs) if self._record(row, samples, round_number)]
        return self._result(rows)


class TeacherStream(Teacher):
    """Ray Data actor, continuous batching: candidate rows -> traces on vLLM's async engine. Every row runs its own
    rounds: its next round is sent as soon as its previous samples are back, into the engine's running batch, which
    also holds the rows of this actor's other batches in flight (`concurrent_batches`)."""

    def __init__(self, run_dir: str, model: str, cfg: dict[str, Any]):
        from pipelines.common import start_async_reranker

        self._setup(cfg)
        cfg = self.cfg
        self.reranker, bound, self._core_lock = start_async_reranker(
            RunDir.open(run_dir), model, cfg.prompt, cfg.teacher.eos_token, cfg.sampling, cfg.engine,
            cfg.cpus_per_actor, cfg.gpus_per_actor, cfg.bind_cores, seed=cfg.seed)
        self.prompts, self.decoding = self.reranker.prompts, self.reranker.decoding
        log.info("traces actor (continuous): teacher %s on cores %s", model, bound or "-")

    async def _rounds(self, row: RowState) -> None:
        round_number, more = 0, True
        while more:
            round_number += 1
            samples = await self.reranker.generate(row.prompt_ids, row.candidate_token_ids, **self._request(row))
            more = self._record(row, samples, round_number)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        import asyncio

        rows, pending = self._rows(batch)
        await asyncio.gather(*(self._rounds(row) for row in pending))
        return self._result(rows)


def fingerprints(cfg: TracesConfig, model: str) -> tuple[dict, dict]:
    """(of the finished file, of the parts): rows are independent, so the parts survive a change of max_rows."""
    final = config_fingerprint(cfg, exclude=TracesConfig.RESOURCE_FIELDS)
    final["engine"].pop("kv_cache_memory_bytes", None)
    final["teacher_digest"] = model_digest(model)
    return final, {k: v for k, v in final.items() if k != "max_rows"}


def finished_fingerprint(run_dir: RunDir, mode: str) -> dict | None:
    return run_dir.parquet_json_metadata(META_KEY, "traces", f"{mode}.parquet")


def sample(cfg: TracesConfig, run_dir: RunDir, model: str, pending: pa.Table, parts: Parts) -> dict[str, float]:
    """Run the teacher over `pending` rows on the actor pool, flushing results to `parts`; returns timing."""
    started = time.perf_counter()
    done = accepted = 0
    buffered: list[pa.Table] = []
    actor = TeacherStream if cfg.continuous and cfg.backend == "vllm" else TeacherBatch
    batches = stream_actor_pool(cfg, pending, actor,
                                {"run_dir": cfg.run_dir, "model": model, "cfg": cfg.model_dump(mode="json")})
    for batch in batches:
        buffered.append(batch)
        done += batch.num_rows
        accepted += pc.sum(batch.column("accepted")).as_py() or 0
        if sum(b.num_rows for b in buffered) >= cfg.flush_rows:
            parts.write(pa.concat_tables(buffered))
            buffered.clear()
        seconds = time.perf_counter() - started
        log.info("traces (%s): %d / %d rows, %d accepted (%.1f rows/s)", cfg.mode, done, pending.num_rows, accepted,
                 done / max(seconds, 1e-9))
    if buffered:
        parts.write(pa.concat_tables(buffered))
    return {"rows_this_run": done, "seconds_this_run": round(time.perf_counter() - started, 2)}


def compute_stats(table: pa.Table, cfg: TracesConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """stats.json: acceptance overall and per round, attempts, tokens per accepted trace, invalid answers."""
    rows = table.num_rows
    accepted = int(pc.sum(table.column("accepted")).as_py() or 0)
    attempts = table.column("attempts").to_numpy()
    rounds = table.column("rounds").to_numpy()
    accepted_round = table.column("accepted_round").to_numpy()
    by_round = {}
    for r in range(1, int(rounds.max(initial=0)) + 1):
        entering = int((rounds >= r).sum())
        won = int((accepted_round == r).sum())
        by_round[str(r)] = {"rows": entering, "accepted": won, "rate": won / entering if entering else None}
    reasons: Counter = Counter()
    for text in table.column("invalid_reasons").to_pylist():
        reasons.update(json.loads(text))
    generated = int(pc.sum(table.column("generated_tokens")).as_py() or 0)
    prompt = int(pc.sum(table.column("request_prompt_tokens")).as_py() or 0)
    samples = int(attempts.sum())
    return {
        "mode": cfg.mode,
        "rows": rows,
        "accepted": accepted,
        "acceptance_rate": accepted / rows if rows else None,
        "acceptance_by_round": by_round,
        "attempts_mean": float(attempts.mean()) if rows else None,
        "attempts_p90": float(np.percentile(attempts, 90)) if rows else None,
        "generated_tokens_per_accepted": generated / accepted if accepted else None,
        "prompt_tokens_per_accepted": prompt / accepted if accepted else None,
        "generated_tokens": generated,
        "samples": samples,
        "invalid_samples": int(sum(reasons.values())),
        "invalid_rate": sum(reasons.values()) / samples if samples else None,
        "invalid_reasons": dict(sorted(reasons.items())),
        "valid_rows": int(pc.sum(table.column("valid")).as_py() or 0),
        "samples_per_round": 1 if cfg.mode == "target" else cfg.samples_per_round,
        "max_attempts": cfg.attempt_budget,
        "constrained": cfg.sampling.constrained,
        **extra,
    }


def run(cfg: TracesConfig) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = RunDir.open(cfg.run_dir)
    model = cfg.teacher.model or run_dir.local_path("models", "midtrain")
    if model.startswith("/") and not pafs.LocalFileSystem().get_file_info(f"{model}/config.json").is_file:
        raise FileNotFoundError(f"no teacher model at {model} (config.json missing); run midtrain or set teacher.model")
    if not run_dir.exists("candidates", "train.parquet"):
        raise FileNotFoundError(f"{run_dir.path('candidates', 'train.parquet')} missing; run the prerank stage first")
    final_fp, parts_fp = fingerprints(cfg, model)
    final_fp["inputs"] = parts_fp["inputs"] = stage_inputs(run_dir, "traces")
    previous = finished_fingerprint(run_dir, cfg.mode)
    parts = Parts(run_dir, "traces", cfg.mode, parts_fp)
    if previous is not None and not cfg.overwrite:
        if previous != final_fp:
            raise config_mismatch("traces", run_dir.path("traces", f"{cfg.mode}.parquet"), previous, final_fp)
        log.info("traces: traces/%s.parquet already written with this config; skipping", cfg.mode)
        return run_dir.read_json("traces", f"stats_{cfg.mode}.json")
    if cfg.overwrite and run_dir.exists("traces", "_parts"):
        run_dir.fs.delete_dir(run_dir.path("traces", "_parts"))
    rows, dropped = eligible_rows(run_dir.read_parquet("candidates", "train.parquet"), cfg)
    done = parts.read(["row_id"])
    pending = rows
    if done is not None:
        pending = rows.filter(pc.invert(pc.is_in(rows.column("row_id"), done.column("row_id"))))
        log.info("traces: %d rows finished by an earlier run, %d to go", rows.num_rows - pending.num_rows,
                 pending.num_rows)
    timing = {"rows_this_run": 0, "seconds_this_run": 0.0}
    if pending.num_rows:
        log.info("traces (%s): %d rows, %d actor(s), teacher %s", cfg.mode, pending.num_rows, cfg.actors, model)
        timing = sample(cfg, run_dir, model, pending.select(["row_id", "history", "candidates", "target"]), parts)
    results = parts.read()
    results = results.filter(pc.is_in(results.column("row_id"), rows.column("row_id"))).sort_by("row_id")
    if results.column("row_id").to_pylist() != rows.column("row_id").to_pylist():
        raise RuntimeError("traces: results do not cover every row exactly once; rerun to finish the missing ones")
    table = rows
    for name in RESULT_SCHEMA.names[1:]:
        table = table.append_column(RESULT_SCHEMA.field(name), results.column(name))
    rate = timing["rows_this_run"] / timing["seconds_this_run"] if timing["seconds_this_run"] else None
    stats = compute_stats(table, cfg, {**dropped, **timing, "rows_per_second": rate,
                                       "resumed_rows": rows.num_rows - pending.num_rows})
    stats["seconds"] = round(time.perf_counter() - started, 2)
    table = table.replace_schema_metadata({META_KEY: json.dumps(final_fp).encode()})
    run_dir.write_parquet(table, "traces", f"{cfg.mode}.parquet")
    run_dir.write_json(stats, "traces", f"stats_{cfg.mode}.json")
    run_dir.write_json(stats, "traces", "stats.json")
    return stats


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(TracesConfig, __doc__, argv)
    stats = run(cfg)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
