"""Stage `rl`: DAPO on the re-ranker with verifiable ranking rewards: vLLM rollout actors + Ray Train/DeepSpeed.

Reads `<run_dir>/candidates/{train,valid}.parquet` (the pre-ranker's lists; rows must hold their target, or get it
inserted with `insert_missing_target`), `data/items.parquet`, `sid/sid_map.parquet` and the starting checkpoint
(`init_model`: an SFT model, or `models/midtrain` for "RL-zero"). The driver wires two things and does no model
math: `rollout.actors` Ray actors, each a vLLM engine (`RolloutWorker`), and a Ray Train `TorchTrainer` whose
workers hold the policy in DeepSpeed ZeRO. Each step, on the trainer's rank 0: the next `prompts_per_step` rows go to
the rollout actors, which sample `samples_per_prompt` answers per row and score them (`rec.rl.score_sample`:
conditional or unconditional reward, overlong shaping); groups whose rewards are all equal are dropped and more rows
are sampled until the batch is full (dynamic sampling, at most `max_gen_batches` batches, then a clear error). All
workers then compute the answers' log-probabilities and take the DAPO update (`rec.rl.dapo_loss`: group-normalised
advantages, clip-higher, token-level mean over the whole batch), and the new weights go into the live vLLM engines
(`pipelines.weight_sync`: layer group by layer group, through safetensors shards on disk or vLLM's NCCL weight
transfer on GPUs; only control messages cross vLLM's RPC; then the prefix cache is reset). Every `eval_every_steps`
the rollout engines re-rank a validation slice greedily: R@1, N@5 (with the pre-rank order of the same rows as the
reference). At the last step trainer rank 0 writes the HF model straight into the output folder.

Code: this file holds the config and the driver; `rl_rollout.py` the rollout actors, `rl_trainer.py` the trainer
workers' loop, `weight_sync.py` the weight transfer, `rl_report.py` the curves.

Writes `<run_dir>/models/{output}/` (HF safetensors + tokenizer + gr2_rerank.json, loadable by transformers, vLLM,
evaluation and serving) with `rl_report.json` and `train_log.jsonl` (per step: reward mean, kept-group fraction,
identity-permutation rate, invalid rate, clip fraction, entropy, response length, loss, and the validation metrics).
Checkpoints: `<run_dir>/models/{output}_ckpt/` through Ray Train; rerunning the same command resumes or, when
finished, skips.

Local:    python -m pipelines.rl --config pipelines/configs/tiny/rl.yaml [rl.reward=unconditional output=rl_uncond]
Cluster:  ray job submit --working-dir . -- python -m pipelines.rl --config pipelines/configs/qwen3_8b/rl.yaml
"""

from __future__ import annotations

import json
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from pipelines.common import EngineSection, exit_on_user_error, init_ray, model_digest, parse_cli
from pipelines.lineage import stage_inputs
from pipelines.rl_trainer import RlJob, val_metrics
from pipelines.traces import eligible_rows
from pipelines.train_utils import (
    TrainSection,
    check_previous,
    count_parameters,
    read_train_log,
    read_trainer_state,
    tokenizer_files,
)
from pipelines.weight_sync import WeightSyncSection
from rec.config import ConfigError, Section, StageConfig, config_fingerprint
from rec.io import RunDir
from rec.rerank import RerankPromptSection, RerankSamplingSection
from rec.rerank_settings import RERANK_SETTINGS, checked_model_settings, trained_lengths
from rec.rerank_settings import rerank_settings_json as settings_json
from rec.rl import DynamicSamplingError

log = logging.getLogger("gr2.rl")

REPORT = "rl_report.json"
RESUMABLE_FIELDS = {"run_dir", "overwrite", "rollout", "num_cpus"}


class RolloutSection(Section):
    """The vLLM engines that sample answers (one per Ray actor)."""

    actors: int = Field(default=1, ge=1)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    """Logical CPUs per actor; on CPU also the cores its engine is bound to."""
    gpus_per_actor: float = Field(default=0.0, ge=0)
    """GPUs per actor (the engine's tensor_parallel_size on GPUs)."""
    bind_cores: bool = True
    engine: EngineSection = Field(default_factory=EngineSection)
    weight_sync: WeightSyncSection = Field(default_factory=WeightSyncSection)
    """How each policy update reaches these engines (files on CPU, nccl on GPUs)."""


class DapoSection(Section):
    """The RL algorithm: rewards, groups, dynamic sampling, the DAPO loss, validation."""

    steps: int = Field(default=20, ge=1)
    """Policy updates (rollout batches) to train for; raising it and rerunning continues from the checkpoint."""
    reward: Literal["conditional", "unconditional"] = "conditional"
    """rec.rl.REWARDS: the paper's conditional reward, or the plain sum (the reward-hacking ablation)."""
    alpha: float = Field(default=0.1, ge=0)
    """Weight of the format reward."""
    prompts_per_step: int = Field(default=8, ge=1)
    """Groups (rows) with differing rewards in each update."""
    samples_per_prompt: int = Field(default=4, ge=2)
    """G: answers sampled per row; advantages are normalised within the group."""
    max_gen_batches: int = Field(default=4, ge=1)
    """Rollout batches of `prompts_per_step` rows tried per update before dynamic sampling gives up."""
    updates_per_step: int = Field(default=1, ge=1)
    """Optimizer steps per rollout batch (mini-batches); > 1 makes the clipping bite."""
    eps_low: float = Field(default=0.2, gt=0, lt=1)
    eps_high: float = Field(default=0.28, gt=0)
    kl_coef: float = Field(default=0.0, ge=0)
    """KL penalty to the starting model (k3 estimator); 0 (DAPO's default) keeps no reference model."""
    overlong_buffer: int = Field(default=0, ge=0)
    """Answers longer than sampling.max_tokens - buffer get a linear penalty down to -overlong_factor (0: off)."""
    overlong_factor: float = Field(default=1.0, ge=0)
    eval_every_steps: int = Field(default=5, ge=1)
    """Validation R@1 / N@5 every this many steps (and at the first and last)."""
    eval_rows: int = Field(default=64, ge=1)
    """Rows of candidates/valid.parquet for the validation metrics."""


class RlConfig(StageConfig):
    init_model: str = "models/sft_reject"
    """Starting checkpoint: a local path, relative ones under run_dir (models/midtrain for RL-zero)."""
    output: str = Field(default="rl", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Model folder under `<run_dir>/models/` (ablations: rl_uncond, rl_zero, rl_target, ...)."""
    max_rows: int | None = Field(default=None, ge=1)
    """Training rows: the first N eligible rows of candidates/train.parquet (null: all)."""
    insert_missing_target: bool = False
    """Lists without the target get it at a seeded position (as in traces/evaluate); false drops those rows."""
    prompt: RerankPromptSection = Field(default_factory=RerankPromptSection)
    """Prompt settings for a starting model without gr2_rerank.json (an SFT model has one, and it wins)."""
    eos_token: str = "<|im_end|>"
    sampling: RerankSamplingSection = Field(default_factory=RerankSamplingSection)
    """How rollouts are sampled (temperature 1 by default); `constrained` decodes valid permutations only."""
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    rl: DapoSection = Field(default_factory=DapoSection)
    train: TrainSection = Field(default_factory=TrainSection)
    """Trainer workers, ZeRO stage, lr, micro-batch (`batch_size` sequences), checkpointing. `grad_accum_steps`
    is derived: one optimizer step per mini-batch of the rollout batch."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs for a local Ray (null: the trainers' and rollout actors' CPUs + 1)."""
    overwrite: bool = False

    CONCURRENT_SECTIONS: ClassVar[tuple[str, ...]] = ("rollout", "train")
    """Sections whose Ray resources are held at the same time (rollout actors live while the trainers run)."""

    @model_validator(mode="after")
    def _check(self) -> RlConfig:
        rl, train = self.rl, self.train
        sequences = rl.prompts_per_step * rl.samples_per_prompt
        per_update = sequences / (train.num_workers * rl.updates_per_step * train.batch_size)
        if per_update < 1 or per_update != int(per_update):
            raise ValueError(
                f"rl.prompts_per_step x rl.samples_per_prompt ({sequences} sequences per step) must split evenly into "
                f"train.num_workers ({train.num_workers}) x rl.updates_per_step ({rl.updates_per_step}) x "
                f"train.batch_size ({train.batch_size}) micro-batches")
        if self.rollout.weight_sync.backend == "nccl" and not (self.rollout.gpus_per_actor > 0 and train.use_gpu):
            raise ValueError("rollout.weight_sync.backend=nccl needs GPU rollout engines (rollout.gpus_per_actor > 0) "
                             "and GPU trainers (train.use_gpu=true); use backend=files on CPU")
        if rl.eps_high < rl.eps_low:
            raise ValueError(f"rl.eps_high ({rl.eps_high}) below rl.eps_low ({rl.eps_low}): clip-higher needs >=")
        return self

    @property
    def grad_accum_steps(self) -> int:
        rl, train = self.rl, self.train
        return rl.prompts_per_step * rl.samples_per_prompt // (train.num_workers * rl.updates_per_step *
                                                                train.batch_size)


def resolve(run_dir: RunDir, path: str) -> str:
    return path if path.startswith("/") else run_dir.local_path(*path.split("/"))


def load_rows(run_dir: RunDir, split: str, cfg: RlConfig, max_rows: int | None) -> tuple[list[dict], dict]:
    path = ("candidates", f"{split}.parquet")
    if not run_dir.exists(*path):
        raise FileNotFoundError(f"{run_dir.path(*path)} missing; run the prerank stage first")
    selection = cfg.model_copy(update={"max_rows": max_rows})
    rows, counts = eligible_rows(run_dir.read_parquet(*path), selection)
    if rows.num_rows == 0:
        raise ValueError(f"{run_dir.path(*path)}: no row holds its target ({counts}); set insert_missing_target=true "
                         "or use a better pre-ranker")
    return rows.select(["row_id", "history", "target", "candidates"]).to_pylist(), counts


def prerank_reference(rows: list[dict]) -> dict[str, float]:
    return val_metrics([row["candidates"] for row in rows], rows)


def load_policy(path: str, dtype: str):
    from rec.model import load_student

    return load_student(path, dtype=getattr(torch, dtype))[1]


def run(cfg: RlConfig) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoTokenizer

    started = time.perf_counter()
    run_dir = RunDir.open(cfg.run_dir)
    init = resolve(run_dir, cfg.init_model)
    if not (Path(init) / "config.json").is_file():
        raise FileNotFoundError(f"no starting model at {init} (config.json missing); run the sft stage, or set "
                                "init_model=models/midtrain for RL-zero")
    # refuse, before anything starts, budgets that would cut the answers the model was trained to write
    settings = checked_model_settings(init, cfg.prompt, cfg.eos_token, cfg.sampling, cfg.rollout.engine.max_model_len,
                                      "rl", engine_field="rollout.engine")
    prompt, eos = settings.prompt, settings.eos_token
    output, ckpt_name = ("models", cfg.output), f"{cfg.output}_ckpt"
    train_rows, train_counts = load_rows(run_dir, "train", cfg, cfg.max_rows)
    eval_rows, eval_counts = load_rows(run_dir, "valid", cfg, cfg.rl.eval_rows)
    fingerprint = config_fingerprint(cfg, exclude=RESUMABLE_FIELDS) | {"init_digest": model_digest(init),
                                                                       "inputs": stage_inputs(run_dir, "rl")}
    fingerprint["rl"].pop("steps")  # more steps continue the same run
    check_previous("rl", run_dir, ckpt_name, output, fingerprint, cfg.overwrite, type(cfg))
    done = read_trainer_state(run_dir, *output)
    if done is not None and done["step"] >= cfg.rl.steps * cfg.rl.updates_per_step and run_dir.exists(*output, REPORT):
        log.info("rl: %s already trained to step %d; nothing to do", run_dir.path(*output), cfg.rl.steps)
        return run_dir.read_json(*output, REPORT)
    tokenizer = AutoTokenizer.from_pretrained(init)
    log.info("rl: %d training rows (%s), %d validation rows; %s reward, %d steps of %d groups x %d samples, from %s",
             len(train_rows), train_counts, len(eval_rows), cfg.rl.reward, cfg.rl.steps, cfg.rl.prompts_per_step,
             cfg.rl.samples_per_prompt, init)

    r, t = cfg.rollout, cfg.train
    init_ray(cfg.num_cpus or int(np.ceil(r.actors * r.cpus_per_actor + t.num_workers * t.cpus_per_worker)) + 1)
    from pipelines.rl_report import plot
    from pipelines.rl_rollout import RolloutWorker
    from pipelines.rl_trainer import rl_worker

    actor_cls = ray.remote(num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor)(RolloutWorker)
    actors = [actor_cls.remote(cfg.run_dir, init, prompt.model_dump(mode="json"), eos, cfg.model_dump(mode="json"))
              for _ in range(r.actors)]
    lengths = settings.lengths or trained_lengths(cfg.sampling)  # what the RL model is trained to write
    job = RlJob(cfg=cfg, build_model=partial(load_policy, init, "bfloat16" if t.precision == "bf16" else "float32"),
                train_rows=train_rows, eval_rows=eval_rows, pad_id=tokenizer.pad_token_id,
                extra_files=tokenizer_files(tokenizer) | {
                    RERANK_SETTINGS: json.dumps(settings_json(prompt, eos, lengths), indent=2).encode()})
    trainer = TorchTrainer(
        rl_worker, train_loop_config={"job": job, "actors": actors,
                                      "tp_sizes": [int(r.engine.extra.get("tensor_parallel_size", 1))] * r.actors},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo", timeout_s=t.process_group_timeout_s),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(name=ckpt_name, storage_path=run_dir.path("models"), storage_filesystem=run_dir.fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        message = str(err)
        if "DynamicSamplingError" in message:  # a setting to change, not a bug: say which, without the traceback
            raise DynamicSamplingError(message[message.index("dynamic sampling:"):].splitlines()[0]) from None
        raise
    finally:
        for actor in actors:
            ray.kill(actor)
    if result.checkpoint is None:
        raise RuntimeError(f"rl: training ended without a checkpoint ({result.error})")
    if read_trainer_state(run_dir, *output) is None:  # the last step's trainer writes the model (rl_trainer)
        raise RuntimeError(f"rl: training ended without writing {run_dir.path(*output)}")
    history = read_train_log(run_dir, *output)
    evals = [h for h in history if "val_ndcg@5" in h]
    run_dir.write_bytes(plot(history, f"RL ({cfg.rl.reward} reward) from {Path(init).name}"), *output, "rl_curves.png")
    report = {
        "model_dir": run_dir.path(*output), "init_model": init, "reward": cfg.rl.reward, "steps": history[-1]["step"],
        "train_rows": len(train_rows), **{f"train_{k}": v for k, v in train_counts.items()},
        "eval_rows": len(eval_rows), "prerank_val": prerank_reference(eval_rows),
        "first_val": {k: evals[0][k] for k in ("val_recall@1", "val_ndcg@5")} if evals else None,
        "final_val": {k: evals[-1][k] for k in ("val_recall@1", "val_ndcg@5")} if evals else None,
        "first_reward": history[0]["reward_mean"], "final_reward": history[-1]["reward_mean"],
        "mean_identity_rate": float(np.mean([h["identity_rate"] for h in history])),
        "final_identity_rate": history[-1]["identity_rate"],
        "mean_step_s": float(np.mean([h["step_s"] for h in history])),
        "mean_sync_s": float(np.mean([h["sync_s"] for h in history])),
        "parameters": count_parameters(run_dir, *output), "seconds": round(time.perf_counter() - started, 1),
        "config": fingerprint,
    }
    run_dir.write_json(report, *output, REPORT)
    return report


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(RlConfig, __doc__, argv)
    if cfg.rollout.gpus_per_actor == 0 and cfg.train.use_gpu:
        raise ConfigError("train.use_gpu=true with CPU rollout engines: set rollout.gpus_per_actor too")
    try:
        report = run(cfg)
    except DynamicSamplingError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({k: v for k, v in report.items() if k != "config"}))


if __name__ == "__main__":
    main()
