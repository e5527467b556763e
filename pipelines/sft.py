"""Stage `sft`: the student learns to reason and re-rank from the teacher's accepted traces.

Reads `<run_dir>/traces/{source}.parquet` (accepted rows only), `data/items.parquet`, `sid/sid_map.parquet` and
the mid-trained student (`init_model`, or `<run_dir>/models/midtrain`). Each example is the re-rank prompt WITHOUT
the target (rec.rerank.PromptBuilder, the same prompt evaluation and serving use) and the teacher's answer as the
assistant turn; the loss covers the assistant turn only, reasoning tokens weighted `lambda_reasoning`, the ranking
`lambda_ranking` (rec.sft_data). `source=promoted` needs no teacher: it reads the pre-ranker's training lists
(`candidates/train.parquet`, the rows that hold their target) and answers each reasoning-free with the list as the
prompt shows it, the target moved to the front (rec.sft_data.promoted_ranking): the student learns to keep the order
it is given and to lift the one item it believes comes next, so a wrong guess costs the target at most one place.
Trains with Ray Train `TorchTrainer` + DeepSpeed ZeRO-2/3 (pipelines.train_utils: gradient accumulation, warm-up +
cosine LR, eval loss on a held-out slice of rows, checkpoints through Ray Train with resume,
`FailureConfig(max_failures)` so a lost worker restarts from the last checkpoint).

Writes `<run_dir>/models/sft_{source}/` (HF safetensors + tokenizer, loadable by transformers and vLLM) with
`sft_report.json` and `gr2_rerank.json` (the prompt settings it was trained with, and its lengths: the teacher's
answer budget and the longest prompt and answer trained on; evaluation, RL and serving read them and refuse a config
that would cut the answers it learned to write).
Checkpoints: `<run_dir>/models/sft_{source}_ckpt/`; rerunning the same command resumes or, when finished, skips.

Local:    python -m pipelines.sft --config pipelines/configs/tiny/sft.yaml [source=target]
Cluster:  ray job submit --working-dir . -- python -m pipelines.sft --config pipelines/configs/qwen3_8b/sft.yaml
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pydantic import Field, model_validator

from pipelines.common import exit_on_user_error, init_ray, local_cpus, model_digest, parse_cli
from pipelines.lineage import stage_inputs
from pipelines.train_utils import (
    TrainJob,
    TrainSection,
    check_previous,
    count_parameters,
    fit,
    publish_checkpoint,
    read_train_log,
    read_trainer_state,
    tokenizer_files,
)
from rec.config import StageConfig, config_fingerprint
from rec.io import RunDir
from pipelines.traces import META_KEY as TRACES_CONFIG_KEY
from rec.rerank import PromptBuilder, RerankPromptSection, RerankSamplingSection
from rec.rerank_settings import RERANK_SETTINGS, RerankLengths, rerank_settings_json, trained_lengths

log = logging.getLogger("gr2.sft")

REPORT = "sft_report.json"
RESUMABLE_FIELDS = {"run_dir", "overwrite", "train"}
PROMOTED = "promoted"


class SftConfig(StageConfig):
    source: Literal["reject", "target", "promoted"] = "reject"
    """What to learn from: traces/{source}.parquet (reject, target), or `promoted`: the pre-rank training lists that
    hold their target, answered with the shown order, target first, and an empty explanation (no teacher)."""
    init_model: str | None = None
    """Student to start from (a local path); null is `<run_dir>/models/midtrain`."""
    output: str | None = None
    """Model folder under `<run_dir>/models/`; null is `sft_{source}`."""
    prompt: RerankPromptSection = Field(default_factory=RerankPromptSection)
    """How prompts are built (saved with the model as gr2_rerank.json for evaluation and serving)."""
    eos_token: str = "<|im_end|>"
    """Token that ends the assistant turn (learned at the end of every answer)."""
    lambda_reasoning: float = Field(default=0.5, ge=0)
    """Loss weight of reasoning tokens (the think block and the JSON explanation)."""
    lambda_ranking: float = Field(default=1.0, gt=0)
    """Loss weight of the ranking and the rest of the answer."""
    max_len: int = Field(default=2048, ge=64)
    """Longest prompt + answer; longer examples are dropped and counted."""
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)
    """Share of the accepted rows held out for the eval loss (chosen by a seeded shuffle)."""
    eval_max_rows: int = Field(default=64, ge=0)
    """At most this many held-out rows."""
    eval_every_steps: int = Field(default=20, ge=1)
    """Eval loss every this many optimizer steps (and at the last)."""
    train: TrainSection = Field(default_factory=TrainSection)
    """Optimisation, Ray Train workers, DeepSpeed ZeRO stage, checkpointing, max_failures."""
    overwrite: bool = False
    """Start again: delete this output's checkpoints and model."""

    @model_validator(mode="after")
    def _check(self) -> SftConfig:
        if self.lambda_reasoning > self.lambda_ranking:
            raise ValueError(f"lambda_reasoning ({self.lambda_reasoning}) should not exceed lambda_ranking "
                             f"({self.lambda_ranking}): the paper weights reasoning tokens less than the ranking")
        return self

    @property
    def output_name(self) -> str:
        return self.output or f"sft_{self.source}"


def source_file(cfg: SftConfig) -> tuple[str, str]:
    """The run-directory file the examples come from."""
    return ("candidates", "train.parquet") if cfg.source == PROMOTED else ("traces", f"{cfg.source}.parquet")


def source_rows(cfg: SftConfig, run_dir: RunDir, builder: PromptBuilder) -> tuple[list[dict], dict[str, int]]:
    """(rows with history, candidates and the answer `completion`, counts): the accepted traces, or for
    `promoted` the pre-rank lists that hold their target (a list without it is counted, `rows_without_target`),
    answered with the order `builder`'s prompt shows, target first."""
    path = source_file(cfg)
    if not run_dir.exists(*path):
        stage = "prerank" if cfg.source == PROMOTED else f"traces stage with mode={cfg.source}"
        raise FileNotFoundError(f"{run_dir.path(*path)} missing; run the {stage}")
    table = run_dir.read_parquet(*path)
    from rec.rerank import JSON_ANSWER, format_answer

    style, top = builder.section.answer, builder.section.answer_top  # top None: every candidate
    if cfg.source != PROMOTED:
        accepted = table.filter(pc.equal(table.column("accepted"), True))
        rows = accepted.select(["history", "candidates", "completion"]).to_pylist()
        if style != JSON_ANSWER:  # the `sids` style has no explanation: the teacher's accepted ranking alone
            for row, ranking in zip(rows, accepted.column("ranking").to_pylist()):
                row["completion"] = format_answer("", builder.candidate_sids(ranking[:top]), style)
        return rows, {"trace_rows": table.num_rows, "accepted_rows": accepted.num_rows}
    from pipelines.traces import eligible_rows
    from rec.sft_data import promoted_ranking

    rows, skipped = eligible_rows(table, SimpleNamespace(seed=cfg.seed, max_rows=None, insert_missing_target=False))
    out = []
    for row in rows.select(["history", "target", "candidates"]).to_pylist():
        shown = builder.shown_order(row["history"], row["candidates"])
        ranking = promoted_ranking(shown, row["target"])
        out.append({"history": row["history"], "candidates": row["candidates"],
                    "completion": format_answer("", builder.candidate_sids(ranking[:top]), style)})
    return out, {"list_rows": table.num_rows, "lists_with_target": len(out), **skipped}


def build_examples(cfg: SftConfig, run_dir: RunDir, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """Answers (rows of `source_rows`) -> tokenised examples (dicts of input_ids, labels, weights), in row order,
    and counts."""
    from rec.sft_data import build_example

    builder = PromptBuilder.for_run(tokenizer, run_dir, cfg.prompt)
    rows, counts = source_rows(cfg, run_dir, builder)
    eos_id = tokenizer.convert_tokens_to_ids(cfg.eos_token)
    examples, too_long, longest_prompt, longest_answer = [], 0, 0, 0
    for row in rows:
        _, prompt_ids = builder.prompt(row["history"], row["candidates"])  # the student never sees the target
        example = build_example(tokenizer, prompt_ids, row["completion"], eos_id, cfg.lambda_reasoning,
                                cfg.lambda_ranking)
        if len(example.input_ids) > cfg.max_len:
            too_long += 1
            continue
        longest_prompt = max(longest_prompt, len(prompt_ids))
        longest_answer = max(longest_answer, len(example.input_ids) - len(prompt_ids))  # answer + eos
        examples.append({"input_ids": example.input_ids, "labels": example.labels, "weights": example.weights})
    counts = {**counts, "dropped_too_long": too_long, "examples": len(examples),
              "longest_prompt_tokens": longest_prompt, "longest_answer_tokens": longest_answer}
    if not examples:
        raise ValueError(f"{run_dir.path(*source_file(cfg))} has no answer that fits max_len={cfg.max_len}: {counts}")
    return examples, counts


def answer_lengths(cfg: SftConfig, run_dir: RunDir, counts: dict[str, int]) -> RerankLengths:
    """What the model is trained to write (saved in gr2_rerank.json): the teacher's sampling budget, read from the
    config the traces stage stored in `traces/{source}.parquet` (older files without it: the longest answer trained
    on), and the longest prompt and answer among the examples. `promoted` answers are written, not sampled: the
    format of a constrained answer with an empty explanation, and no teacher budget."""
    measured = {"longest_answer_tokens": counts["longest_answer_tokens"],
                "longest_prompt_tokens": counts["longest_prompt_tokens"], "max_len": cfg.max_len}
    if cfg.source == PROMOTED:
        written = trained_lengths(RerankSamplingSection(constrained=True, max_explanation_tokens=0), **measured)
        return written.model_copy(update={"teacher_max_tokens": None})
    traces_config = run_dir.parquet_json_metadata(TRACES_CONFIG_KEY, "traces", f"{cfg.source}.parquet") or {}
    sampling = traces_config.get("sampling")
    return trained_lengths(RerankSamplingSection.model_validate(sampling) if sampling is not None else None,
                           **measured)


def split_eval(examples: list[dict], cfg: SftConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a seeded share of the rows, at most eval_max_rows."""
    order = np.random.default_rng(cfg.seed).permutation(len(examples))
    held = min(int(len(examples) * cfg.eval_fraction), cfg.eval_max_rows)
    workers = cfg.train.num_workers
    if cfg.eval_fraction > 0 and held < workers and len(examples) >= 4 * workers:
        held = workers  # every worker evaluates the same number of rows: fewer than one each would evaluate none
    held_out = set(order[:held].tolist())
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def load_model(path: str, dtype: str):
    """On a worker: the student to fine-tune."""
    import torch

    from rec.model import load_student

    return load_student(path, dtype=getattr(torch, dtype))[1]


def weighted_loss(model, batch) -> tuple[Any, int]:
    """The weighted answer loss (`rec.sft_data.weighted_lm_loss`); under ZeRO 0-2 the LM head runs on the answer
    positions only (`rec.model.logits_at_labels`: the prompt's positions never reach it)."""
    import torch

    from rec.model import logits_at_labels
    from rec.sft_data import weighted_lm_loss

    tokens = int(batch["attention_mask"].sum())
    stage = model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else 0
    if stage >= 3:  # ZeRO-3 gathers parameters in the engine's forward
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return weighted_lm_loss(out.logits, batch["labels"], batch["weights"]), tokens
    module = getattr(model, "module", model)
    logits, targets, keep = logits_at_labels(module, batch["labels"], input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"])
    if logits is None:
        return targets, tokens
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return (losses * batch["weights"][:, 1:][keep]).sum() / keep.sum(), tokens


def run(cfg: SftConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from rec.sft_data import collate

    started = time.perf_counter()
    run_dir = RunDir.open(cfg.run_dir)
    init = cfg.init_model or run_dir.local_path("models", "midtrain")
    if not pafs.LocalFileSystem().get_file_info(f"{init}/config.json").is_file:
        raise FileNotFoundError(f"no student at {init} (config.json missing); run midtrain or set init_model")
    output = ("models", cfg.output_name)
    ckpt_name = f"{cfg.output_name}_ckpt"
    tokenizer = AutoTokenizer.from_pretrained(init)
    examples, counts = build_examples(cfg, run_dir, tokenizer)
    train_rows, eval_rows = split_eval(examples, cfg)
    fingerprint = config_fingerprint(cfg, exclude=RESUMABLE_FIELDS) | {
        "init_digest": model_digest(init), "examples": len(examples),
        "inputs": stage_inputs(run_dir, "sft", ["/".join(source_file(cfg))]),
    }
    check_previous("sft", run_dir, ckpt_name, output, fingerprint, cfg.overwrite, type(cfg))
    steps_per_epoch, total_steps = cfg.train.steps_for(len(train_rows))
    log.info("sft: %d examples from %s (%s); %d train / %d held out; %d steps/epoch, to step %d",
             len(examples), "/".join(source_file(cfg)), counts, len(train_rows), len(eval_rows), steps_per_epoch, total_steps)
    done = read_trainer_state(run_dir, *output)
    if done is not None and done["step"] == total_steps and run_dir.exists(*output, REPORT):
        log.info("sft: %s already trained to step %d; nothing to do", run_dir.path(*output), total_steps)
        return run_dir.read_json(*output, REPORT)

    init_ray(local_cpus(None, cfg.train.num_workers * cfg.train.cpus_per_worker, "the Ray Train workers"))
    import ray.data

    pad_id = tokenizer.pad_token_id
    job = TrainJob(
        train=cfg.train, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        build_model=partial(load_model, init, "bfloat16" if cfg.train.precision == "bf16" else "float32"),
        loss_fn=weighted_loss, collate_fn=partial(collate, pad_id=pad_id),
        extra_files=tokenizer_files(tokenizer), seed=cfg.seed, stage="sft",
        eval_rows=eval_rows or None, eval_every_steps=cfg.eval_every_steps,
    )
    train_started = time.perf_counter()
    result = fit(job, ray.data.from_items(train_rows), storage_path=run_dir.path("models"), name=ckpt_name,
                 storage_filesystem=run_dir.fs)
    train_seconds = time.perf_counter() - train_started
    if result.checkpoint is None:
        raise RuntimeError(f"sft: training ended without a checkpoint ({result.error})")
    publish_checkpoint(result.checkpoint, run_dir, *output)
    lengths = answer_lengths(cfg, run_dir, counts)
    run_dir.write_json(rerank_settings_json(cfg.prompt, cfg.eos_token, lengths), *output, RERANK_SETTINGS)
    state = read_trainer_state(run_dir, *output)
    metrics = result.metrics or {}
    mean_tokens = float(np.mean([len(row["input_ids"]) for row in train_rows]))
    history = read_train_log(run_dir, *output)
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") is not None]
    report = {
        "model_dir": run_dir.path(*output), "source": cfg.source, "init_model": init, **counts,
        "train_examples": len(train_rows), "eval_examples": len(eval_rows), "steps": state["step"],
        "resumed_from_step": state.get("resumed_from_step"), "first_loss": history[0]["loss"] if history else None,
        # the first evaluation runs at step eval_every_steps (or the last step), not before training
        "final_loss": metrics.get("loss"), "eval_loss_first": evals[0][1] if evals else None,
        "eval_loss_first_step": evals[0][0] if evals else None,
        "final_eval_loss": evals[-1][1] if evals else None, "tokens_per_s": metrics.get("tokens_per_s"),
        # tokens/s is measured after start-up (train_utils); an example averages `mean_tokens` non-pad tokens
        "samples_per_s": metrics["tokens_per_s"] / mean_tokens if metrics.get("tokens_per_s") else None,
        "parameters": count_parameters(run_dir, *output), "seconds_train": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1), "config": fingerprint,
    }
    run_dir.write_json(report, *output, REPORT)
    return report


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(SftConfig, __doc__, argv)
    report = run(cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}))


if __name__ == "__main__":
    main()
