"""Stage `midtrain`: teach the student LLM the SID tokens (next-item prediction + SID <-> item text).

Reads `<run_dir>/data/{items,train}.parquet` and `<run_dir>/sid/{sid_map.parquet,report.json}`; builds (tiny
preset: trains a BPE tokenizer and builds a tiny Qwen3) or loads (hub id / path) the student, adds the SID tokens,
tokenises the task mixture on the driver (rec.midtrain_data), and trains with Ray Train `TorchTrainer` + DeepSpeed
ZeRO over Ray Data shards. Resumable checkpoints go to `<run_dir>/models/midtrain_ckpt/` (rerun the same command
to resume after a crash, or with a larger max_steps to train on); the final model (HF safetensors + tokenizer,
loadable by transformers and vLLM, with `train_log.jsonl`) is published to `<run_dir>/models/midtrain/`, and
`<run_dir>/models/midtrain/midtrain_report.json` marks the stage as done.

Local:    python -m pipelines.midtrain --config pipelines/configs/tiny/midtrain.yaml [run_dir=runs/tiny train.max_steps=200]
Cluster:  ray job submit --working-dir . -- python -m pipelines.midtrain --config pipelines/configs/qwen3_8b/midtrain.yaml
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from functools import partial
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipelines.common import exit_on_user_error, init_ray, local_cpus, parse_cli
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
from rec.config import Section, StageConfig, config_fingerprint
from rec.io import DataError, RunDir
from rec.midtrain_data import (
    PACKING_FORMAT,
    TASKS,
    SidEncoder,
    build_task_examples,
    collate,
    held_out_examples,
    loss_on_labels,
    mix,
    mixture_stats,
    model_inputs,
    pack,
    tokenizer_corpus,
    unpacked,
)
from rec.model import ModelSection, SidCodeTables, sid_token_ids

log = logging.getLogger("gr2.midtrain")

CKPT_NAME = "midtrain_ckpt"
OUTPUT = ("models", "midtrain")
REPORT = "midtrain_report.json"
# Fields that may change between a run and its resumption: the `train` section (schedule length, workers,
# checkpointing...), so a rerun with a larger max_steps continues the stored run. A different num_workers is
# refused when the ZeRO shards are loaded.
RESUMABLE_FIELDS = {"run_dir", "overwrite", "train", "held_out"}


class MidtrainDataSection(Section):
    """The task mixture and how it is tokenised."""

    weights: dict[str, float] = Field(default_factory=lambda: {"next_item": 1.0, "sid_to_text": 1.0, "text_to_sid": 1.0})
    """Passes over each task's examples per mixture epoch (tasks: next_item, sid_to_text, text_to_sid; 0 drops one)."""
    seq_len: int = Field(default=512, ge=32)
    """Tokens per training row (and the longest next-item chunk)."""
    packing: bool = True
    """Pack several examples into each row of seq_len tokens; false gives one padded example per row."""
    max_text_tokens: int = Field(default=96, ge=8)
    """Item text is cut to this many tokens in the SID <-> text tasks."""
    min_history: int = Field(default=1, ge=0)
    """Next-item targets start after this many items of a user's sequence."""
    next_item_markers: bool = True
    """Take the next-item loss on each target's `<|sid_begin|>` / `<|sid_end|>` too. false trains on the codes only:
    the pre-ranker's beam search forces both markers, so they are never scored, and with `sid_softmax: level` they
    are the only next-item labels left on the full-vocabulary head (2 of every levels + 2): 1.67x faster steps on
    tiny_full, but a worse pre-ranker there (R@5 0.0416 vs 0.0453 at 5.5 epochs; README, midtrain), so no preset sets
    it. The text tasks keep their markers either way."""
    max_users: int | None = Field(default=None, ge=1)
    """Use only the first this-many users of data/train.parquet (quick runs); null uses all."""

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS)}")
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0 with at least one > 0, got {weights}")
        return weights


class HeldOutSection(Section):
    """A held-out next-item loss logged while training: the over-fitting / early-stopping signal.

    Every `every_steps` optimizer steps (and at the last) the model scores the targets of the first `users` rows of
    data/valid.parquet (never training targets) from their pre-ranking prompts (`rec.midtrain_data.held_out_examples`):
    `eval_loss` in the log, train_log.jsonl and TensorBoard, and the curve with its best step in the stage report.
    It changes nothing that is trained, so it may differ between a run and its resumption."""

    users: int = Field(default=1000, ge=0)
    """Valid-split users scored (the first this-many); 0 turns the held-out loss off."""
    every_steps: int = Field(default=250, ge=1)
    """Optimizer steps between two held-out losses."""


class MidtrainConfig(StageConfig):
    model: ModelSection = Field(default_factory=ModelSection)
    """The student: tiny dims or a hub id / local path."""
    data: MidtrainDataSection = Field(default_factory=MidtrainDataSection)
    """Task mixture and tokenisation."""
    train: TrainSection = Field(default_factory=TrainSection)
    """Optimisation, Ray Train workers, DeepSpeed ZeRO stage, checkpointing."""
    held_out: HeldOutSection = Field(default_factory=HeldOutSection)
    """The held-out next-item loss logged during training (valid-split targets)."""
    sid_softmax: Literal["vocab", "level"] = "vocab"
    """What a SID code label is scored against: `vocab` (the full vocabulary, the plain causal-LM loss) or `level`
    (that level's codebook_size codes only, `rec.midtrain_data.loss_on_labels`; text labels keep the vocabulary).
    Written into the model's config.json (`sid_softmax`), so that every beam search over the model (prerank, the
    serving Ranker) normalises its scores the same way (`rec.beam`). `level` is the cheaper head and the exact
    distribution of trie-constrained decoding; it needs zero_stage <= 2 (ZeRO-3 takes the engine's full forward)."""
    overwrite: bool = False
    """Start again: delete the checkpoints and the published model of an earlier run in this run_dir."""

    @model_validator(mode="after")
    def _check_sid_softmax(self) -> "MidtrainConfig":
        if self.sid_softmax == "level" and self.train.zero_stage >= 3:
            raise ValueError("sid_softmax: level needs train.zero_stage <= 2 (ZeRO-3 gathers the parameters inside "
                             "the DeepSpeed engine's forward, which computes the full-vocabulary loss); set "
                             "sid_softmax: vocab or zero_stage: 2")
        return self


def _tokenizer_from_files(files: dict[str, bytes]):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as directory:
        for name, data in files.items():
            with open(os.path.join(directory, name), "wb") as out:
                out.write(data)
        return AutoTokenizer.from_pretrained(directory)


def prepare_tokenizer(cfg: MidtrainConfig, run_dir: RunDir, texts: list[str], levels: int, codebook_size: int):
    """The tokenizer with SID tokens: reused from an earlier (resumed) run, else trained (tiny) or loaded + extended."""
    import pyarrow.fs as pafs

    from rec.model import add_sid_tokens, train_tokenizer

    stored = ("models", CKPT_NAME, "tokenizer")
    if run_dir.exists(*stored, "tokenizer.json"):
        files = {}
        for info in run_dir.fs.get_file_info(pafs.FileSelector(run_dir.path(*stored))):
            with run_dir.fs.open_input_stream(info.path) as src:
                files[info.base_name] = src.read()
        return _tokenizer_from_files(files)
    if cfg.model.name_or_path is None:
        tokenizer = train_tokenizer(tokenizer_corpus(texts), cfg.model.tokenizer_vocab_size, levels, codebook_size)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        add_sid_tokens(tokenizer, None, levels, codebook_size)
    for name, data in tokenizer_files(tokenizer).items():
        run_dir.write_bytes(data, *stored, name)
    return tokenizer


def build_student(model_cfg: ModelSection, files: dict[str, bytes], seed: int, dtype: str = "float32",
                  sid_softmax: str = "vocab"):
    """On a worker: the tiny model built from dims, or the hub/local model with embeddings resized to the tokenizer;
    its config carries `sid_softmax` (saved with every checkpoint, read by `rec.model.sid_softmax_of`)."""
    import torch

    from rec.model import (
        add_training_dropout,
        build_tiny_model,
        configure_special_ids,
        first_sid_token_id,
        fit_embeddings,
    )

    tokenizer = _tokenizer_from_files(files)
    if model_cfg.name_or_path is None:
        model = build_tiny_model(model_cfg, len(tokenizer), seed=seed)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=getattr(torch, dtype))
        # the SID rows may start inside the hub model's spare (never trained) rows: fit_embeddings initialises them all
        first_new = first_sid_token_id(tokenizer)
        fit_embeddings(model, len(tokenizer), first_new if first_new is not None else len(tokenizer))
    configure_special_ids(tokenizer, model)
    model.config.sid_softmax = sid_softmax
    add_training_dropout(model, model_cfg.dropout)
    return model


def causal_lm_loss(model, batch, sid_codes=None) -> tuple[Any, int]:
    """Mean next-token loss over the label tokens (answers only); tokens = non-padding positions.

    Every packed example attends only to itself (`rec.midtrain_data.model_inputs`: per-example position_ids, so
    sdpa/eager get a block-diagonal causal mask and flash kernels varlen boundaries). `sid_codes`
    (`rec.model.SidCodeTables`) selects the `level` SID softmax (`rec.midtrain_data.loss_on_labels`).
    """
    module = getattr(model, "module", model)  # the DeepSpeed engine wraps the HF model
    inputs = model_inputs(batch, module.config._attn_implementation)
    tokens = int(batch["attention_mask"].sum())
    stage = model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else 0
    if stage < 3:  # the LM head on the label positions only (ZeRO-3 gathers parameters in the engine's forward)
        return loss_on_labels(module, inputs, sid_codes), tokens
    return model(**inputs).loss, tokens


def check_every_item_has_a_sid(run_dir: RunDir, item_ids, sid_item_ids) -> None:
    """sid/sid_map.parquet must cover data/items.parquet: SIDs of another catalogue are an error naming items."""
    missing = sorted(set(item_ids) - set(sid_item_ids))
    if missing:
        raise DataError(
            f"{run_dir.path('sid', 'sid_map.parquet')} has no SID for {len(missing)} of the {len(item_ids)} items of "
            f"{run_dir.path('data', 'items.parquet')} (e.g. item {', '.join(map(str, missing[:5]))}): it was written "
            "for another catalogue; rerun sid with overwrite=true and the stages after it (`make demo FROM=sid`)")


def held_out_rows(cfg: MidtrainConfig, run_dir: RunDir, tokenizer, sid_map, codebook_size: int) -> list[dict] | None:
    """The rows of the held-out next-item loss: the first `held_out.users` valid-split targets, unpacked (None: off)."""
    if not cfg.held_out.users or not run_dir.exists("data", "valid.parquet"):
        return None
    valid = run_dir.read_parquet("data", "valid.parquet").slice(0, cfg.held_out.users).to_pydict()
    encoder = SidEncoder(tokenizer, sid_map["item_id"], np.array(list(sid_map["codes"])), codebook_size)
    examples = held_out_examples(encoder, zip(valid["user_id"], valid["history"], valid["target"]), cfg.data.seq_len)
    # similar lengths in a batch: little padding (the loss is a mean over rows, each with `levels` labels)
    return unpacked(sorted(examples, key=lambda e: len(e.input_ids))) or None


def held_out_curve(history: list[dict], users: int) -> dict[str, Any] | None:
    """The held-out loss by step, its best step and the last step's, from the training log."""
    points = [(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") is not None]
    if not points:
        return None
    best_step, best_loss = min(points, key=lambda point: point[1])
    return {"users": users, "steps": [step for step, _ in points], "loss": [loss for _, loss in points],
            "best_step": best_step, "best_loss": best_loss,
            "last_step": points[-1][0], "last_loss": points[-1][1]}


def run(cfg: MidtrainConfig) -> dict[str, Any]:
    start = time.perf_counter()
    run_dir = RunDir.open(cfg.run_dir)
    items = run_dir.read_parquet("data", "items.parquet").to_pydict()
    train_table = run_dir.read_parquet("data", "train.parquet")
    if cfg.data.max_users is not None:
        train_table = train_table.slice(0, cfg.data.max_users)
    sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
    codebook_size = int(run_dir.read_json("sid", "report.json")["codebook_size"])
    levels = len(sid_map["codes"][0])
    # the inputs are part of what is trained: new SIDs or data must not resume an old run's checkpoints
    fingerprint = config_fingerprint(cfg, exclude=RESUMABLE_FIELDS) | {
        "inputs": stage_inputs(run_dir, "midtrain"), "codebook_size": codebook_size}
    if cfg.data.packing:
        # checkpoints trained on rows of another packing format (format 1 attended across examples) are not resumed
        fingerprint["packing_format"] = PACKING_FORMAT
    check_previous("midtrain", run_dir, CKPT_NAME, OUTPUT, fingerprint, cfg.overwrite, type(cfg))
    check_every_item_has_a_sid(run_dir, items["item_id"], sid_map["item_id"])

    tokenizer = prepare_tokenizer(cfg, run_dir, items["text"], levels, codebook_size)
    tasks = build_task_examples(
        tokenizer, items, sid_map, train_table.to_pydict(), codebook_size,
        max_len=cfg.data.seq_len, max_text_tokens=cfg.data.max_text_tokens, min_history=cfg.data.min_history,
        next_item_markers=cfg.data.next_item_markers,
    )
    examples = mix(tasks, cfg.data.weights, cfg.seed)
    stats = mixture_stats(examples)
    rows = pack(examples, cfg.data.seq_len) if cfg.data.packing else unpacked(examples)
    steps_per_epoch, total_steps = cfg.train.steps_for(len(rows))
    log.info("midtrain: %d examples -> %d rows of <= %d tokens; %s", len(examples), len(rows), cfg.data.seq_len, stats)
    log.info("midtrain: %d steps/epoch, training to step %d", steps_per_epoch, total_steps)

    done = read_trainer_state(run_dir, *OUTPUT)
    if done is not None and done["step"] == total_steps and run_dir.exists(*OUTPUT, REPORT):
        log.info("midtrain: %s already trained to step %d; nothing to do", run_dir.path(*OUTPUT), total_steps)
        return run_dir.read_json(*OUTPUT, REPORT)

    eval_rows = held_out_rows(cfg, run_dir, tokenizer, sid_map, codebook_size)
    init_ray(local_cpus(None, cfg.train.num_workers * cfg.train.cpus_per_worker, "the Ray Train workers"))
    import ray.data

    dataset = ray.data.from_items(rows)
    files = tokenizer_files(tokenizer)
    job = TrainJob(
        train=cfg.train,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        build_model=partial(
            build_student, cfg.model, files, cfg.seed, "bfloat16" if cfg.train.precision == "bf16" else "float32",
            cfg.sid_softmax,
        ),
        loss_fn=(partial(causal_lm_loss, sid_codes=SidCodeTables.of(sid_token_ids(tokenizer, levels, codebook_size),
                                                                     len(tokenizer)))
                 if cfg.sid_softmax == "level" else causal_lm_loss),
        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id),
        extra_files=files,
        seed=cfg.seed,
        stage="midtrain",
        eval_rows=eval_rows,
        eval_every_steps=cfg.held_out.every_steps if eval_rows else None,
    )
    train_start = time.perf_counter()
    result = fit(job, dataset, storage_path=run_dir.path("models"), name=CKPT_NAME, storage_filesystem=run_dir.fs)
    train_seconds = time.perf_counter() - train_start
    if result.checkpoint is None:
        raise RuntimeError(f"midtrain: training ended without a checkpoint ({result.error})")
    publish_checkpoint(result.checkpoint, run_dir, *OUTPUT)
    state = read_trainer_state(run_dir, *OUTPUT)
    metrics = result.metrics or {}
    report = {
        "model_dir": run_dir.path(*OUTPUT),
        "steps": state["step"],
        "resumed_from_step": state.get("resumed_from_step"),
        "tokens": state["tokens"],
        "final_loss": metrics.get("loss"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "parameters": count_parameters(run_dir, *OUTPUT),
        "vocab_size": len(tokenizer),
        "rows": len(rows),
        "mixture": stats,
        "seconds_train": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "held_out": held_out_curve(read_train_log(run_dir, *OUTPUT), len(eval_rows or [])),
        "config": fingerprint,
    }
    run_dir.write_json(report, *OUTPUT, REPORT)
    return report


@exit_on_user_error
def main() -> None:
    cfg = parse_cli(MidtrainConfig, __doc__)
    report = run(cfg)
    print(
        f"midtrain: {report['steps']} steps, final loss {report['final_loss']}, "
        f"{report['tokens_per_s'] or 0:.0f} tokens/s, {report['parameters']} parameters -> {report['model_dir']}"
    )
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "mixture")}))


if __name__ == "__main__":
    main()
