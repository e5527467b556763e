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
(`rec.engines.push_weights`: safetensors bytes through `collective_rpc` -> `reload_weights`, then the prefix cache
is reset). Every `eval_every_steps` the rollout engines re-rank a validation slice greedily: R@1, N@5 (with the
pre-rank order of the same rows as the reference).

Writes `<run_dir>/models/{output}/` (HF safetensors + tokenizer + gr2_rerank.json, loadable by transformers, vLLM,
evaluation and serving) with `rl_report.json` and `train_log.jsonl` (per step: reward mean, kept-group fraction,
identity-permutation rate, invalid rate, clip fraction, entropy, response length, loss, and the validation metrics).
Checkpoints: `<run_dir>/models/{output}_ckpt/` through Ray Train; rerunning the same command resumes or, when
finished, skips.

Local:    python -m pipelines.rl --config pipelines/configs/tiny/rl.yaml [rl.reward=unconditional output=rl_uncond]
Cluster:  ray job submit --working-dir . -- python -m pipelines.rl --config pipelines/configs/qwen3_8b/rl.yaml
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from pipelines.common import EngineSection, exit_on_user_error, init_ray, model_digest, parse_cli
from pipelines.traces import eligible_rows
from pipelines.train_utils import (
    TrainSection,
    check_previous,
    count_parameters,
    full_state_dict,
    publish_checkpoint,
    read_train_log,
    read_trainer_state,
    tokenizer_files,
)
from rec.config import ConfigError, Section, StageConfig, config_fingerprint
from rec.io import RunDir
from rec.rerank import RERANK_SETTINGS, RerankPromptSection, RerankSamplingSection, model_rerank_settings
from rec.rerank import rerank_settings_json as settings_json
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


# ------------------------------------------------------------------------------------------------ rollout actors


class RolloutWorker:
    """A vLLM engine that samples and scores answer groups, re-ranks validation rows greedily, and takes new
    weights in place. A plain class: the driver makes it a Ray actor."""

    def __init__(self, run_dir: str, model: str, prompt: dict, eos_token: str, cfg: dict[str, Any]):
        from pipelines.common import setup_logging, start_reranker
        from rec.engines import WEIGHT_SYNC_EXTENSION, Reranker, RerankGenerator

        setup_logging()
        self.cfg = cfg = RlConfig.model_validate(cfg)
        r = cfg.rollout
        self.reranker, bound, self._core_lock = start_reranker(
            RunDir.open(run_dir), model, RerankPromptSection.model_validate(prompt), eos_token, cfg.sampling,
            r.engine, r.cpus_per_actor, r.gpus_per_actor, r.bind_cores, seed=cfg.seed,
            worker_extension_cls=WEIGHT_SYNC_EXTENSION)
        sampler = self.reranker.generator
        self.llm = sampler.llm
        greedy = cfg.sampling.model_copy(update={"temperature": 0.0})
        self.greedy = Reranker(self.reranker.prompts, RerankGenerator(sampler.tokenizer, sampler.eos_id, greedy,
                                                                      llm=self.llm), r.engine.max_model_len)
        log.info("rollout actor: %s on cores %s", model, bound or "-")

    def sample(self, rows: list[dict], samples: int) -> list[dict]:
        """Per row: {row_id, prompt_ids, samples: [{completion_ids, reward, rank_reward, valid, identity, length}]}.
        A row whose prompt does not fit the engine is skipped (counted by the caller)."""
        from rec.answer_constraint import RankingConstraint
        from rec.rerank import final_ranking, parse_answer
        from rec.rl import constrained_choices, score_sample

        cfg, prompts, generator = self.cfg, self.reranker.prompts, self.reranker.generator
        built = []
        for row in rows:
            _, prompt_ids = prompts.prompt(row["history"], row["candidates"])
            token_ids = prompts.candidate_token_ids(row["candidates"])
            if len(prompt_ids) + generator.max_tokens(token_ids) <= cfg.rollout.engine.max_model_len:
                built.append((row, prompt_ids, token_ids))
        answers = generator.generate([b[1] for b in built], [b[2] for b in built], [samples] * len(built),
                                     with_ids=True) if built else []
        groups = []
        for (row, prompt_ids, token_ids), group in zip(built, answers):
            scored = []
            for text, length, completion_ids in group:
                loss_mask, choices = [1] * len(completion_ids), {}
                if generator.format is not None:  # sampled under the ranking constraint: the policy's own choices
                    constraint = RankingConstraint(generator.format, token_ids, cfg.sampling.max_explanation_tokens)
                    loss_mask, choices = constrained_choices(constraint, completion_ids)
                parsed = parse_answer(text, prompts.candidate_sids(row["candidates"]))
                ranking, reason = final_ranking(parsed, row["candidates"])
                s = score_sample(ranking, reason is None, row["candidates"], row["target"], cfg.rl.reward,
                                 cfg.rl.alpha, length, generator.max_tokens([]) if not cfg.sampling.constrained
                                 else 0, cfg.rl.overlong_buffer, cfg.rl.overlong_factor)
                scored.append({"completion_ids": completion_ids, "loss_mask": loss_mask, "choices": choices,
                               "reward": s.reward, "rank_reward": s.rank_reward, "valid": s.valid,
                               "identity": s.identity, "length": length})
            groups.append({"row_id": row["row_id"], "prompt_ids": prompt_ids, "samples": scored})
        return groups

    def rerank(self, rows: list[dict]) -> list[list[int]]:
        """Greedy final rankings (the validation metrics)."""
        return [r.ranking for r in self.greedy.rerank([r["history"] for r in rows], [r["candidates"] for r in rows])]

    def load_weights(self, blob: bytes) -> None:
        from rec.engines import push_weights

        push_weights(self.llm, blob)

    def logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        from rec.engines import completion_logprobs

        return completion_logprobs(self.llm, prompt_ids, completion_ids)


# ------------------------------------------------------------------------------------------------ trainer workers


@dataclass
class RlJob:
    """What `rl_worker` trains; pickled to the Ray Train workers (with the rollout actor handles)."""

    cfg: RlConfig
    build_model: Any
    train_rows: list[dict]
    eval_rows: list[dict]
    pad_id: int
    extra_files: dict[str, bytes] = field(default_factory=dict)
    stage: str = "rl"

    @property
    def train(self) -> TrainSection:
        return self.cfg.train.model_copy(update={"grad_accum_steps": self.cfg.grad_accum_steps})

    @property
    def total_steps(self) -> int:
        return self.cfg.rl.steps * self.cfg.rl.updates_per_step


def next_rows(job: RlJob, cursor: int, count: int) -> list[dict]:
    """Rows `cursor .. cursor + count` of an endless stream: a fresh seeded shuffle of the training rows per pass."""
    n = len(job.train_rows)
    out = []
    for position in range(cursor, cursor + count):
        epoch, index = divmod(position, n)
        order = np.random.default_rng([job.cfg.seed, epoch]).permutation(n)
        out.append(job.train_rows[int(order[index])])
    return out


def collect(job: RlJob, actors: list, cursor: int) -> tuple[list[dict], dict[str, float], int]:
    """Rollouts until `prompts_per_step` informative groups are found (rank 0): (groups, stats, new cursor)."""
    import ray

    from rec.rl import DynamicBatch

    rl = job.cfg.rl
    batch = DynamicBatch(target_groups=rl.prompts_per_step, max_gen_batches=rl.max_gen_batches)
    samples, skipped = [], 0
    while not batch.full:
        rows = next_rows(job, cursor, rl.prompts_per_step)
        cursor += len(rows)
        chunks = [rows[i::len(actors)] for i in range(len(actors))]
        groups = [g for part in ray.get([a.sample.remote(c, rl.samples_per_prompt) for a, c in zip(actors, chunks)
                                         if c]) for g in part]
        skipped += len(rows) - len(groups)
        samples += [s for g in groups for s in g["samples"]]
        rewards = torch.tensor([[s["reward"] for s in g["samples"]] for g in groups], dtype=torch.float64)
        batch.add(groups, rewards.reshape(len(groups), rl.samples_per_prompt))
    stats = {
        "reward_mean": float(np.mean([s["reward"] for s in samples])),
        "rank_reward_mean": float(np.mean([s["rank_reward"] for s in samples])),
        "kept_group_fraction": batch.kept_fraction,
        "identity_rate": float(np.mean([s["identity"] for s in samples])),
        "invalid_rate": float(np.mean([not s["valid"] for s in samples])),
        "response_length": float(np.mean([s["length"] for s in samples])),
        "gen_batches": batch.generated_batches,
        "rows_too_long": skipped,
    }
    return batch.groups[: rl.prompts_per_step], stats, cursor


def validation(job: RlJob, actors: list) -> dict[str, float]:
    """Greedy re-ranking of the validation rows on the rollout engines: R@1 and N@5 of the target."""
    import ray

    rows = job.eval_rows
    chunks = [rows[i::len(actors)] for i in range(len(actors))]
    rankings = [r for part in ray.get([a.rerank.remote(c) for a, c in zip(actors, chunks) if c]) for r in part]
    return val_metrics(rankings, [row for c in chunks for row in c])


def val_metrics(rankings: list[list[int]], rows: list[dict]) -> dict[str, float]:
    """R@1 and N@5 of the rows' targets in `rankings`.

    >>> val_metrics([[3, 1, 2], [1, 2, 3]], [{"target": 3}, {"target": 2}])
    {'val_recall@1': 0.5, 'val_ndcg@5': 0.8154648767857288}
    """
    from rec.metrics import ndcg_at_k, recall_at_k

    ranks = np.array([ranking.index(row["target"]) for ranking, row in zip(rankings, rows)])
    return {"val_recall@1": recall_at_k(ranks, 1), "val_ndcg@5": ndcg_at_k(ranks, 5)}


def sync_weights(engine, job: RlJob, actors: list, rank: int) -> float:
    """The policy's full weights into every rollout engine (ZeRO-3 gathers them collectively); seconds taken."""
    import ray
    import torch.distributed as dist
    from safetensors.torch import save

    start = time.perf_counter()
    weights = full_state_dict(engine, job.cfg.train.zero_stage, rank)
    if rank == 0:
        # separate contiguous copies: tied weights (lm_head = embeddings) share storage, which safetensors refuses
        blob = save({name: tensor.detach().cpu().contiguous().clone() for name, tensor in weights.items()})
        ray.get([a.load_weights.remote(blob) for a in actors])
    dist.barrier()
    return time.perf_counter() - start


def policy_update(engine, ref_model, job: RlJob, groups: list[dict], rank: int, world: int, device
                  ) -> dict[str, float]:
    """DAPO on one rollout batch: every rank takes its share of the sequences, `updates_per_step` optimizer steps.

    The loss of each micro-batch is rescaled so that, after DeepSpeed divides by the accumulation steps and
    averages over ranks, the gradient is that of the token-level mean over every answer token of the mini-batch.
    """
    from rec.rl import DapoLossConfig, completion_logprobs, dapo_loss, group_advantages, policy_batch

    cfg = job.cfg
    rewards = torch.tensor([[s["reward"] for s in g["samples"]] for g in groups], dtype=torch.float32)
    advantages = group_advantages(rewards)
    sequences = [(g["prompt_ids"], s["completion_ids"], float(a), s["loss_mask"], s["choices"])
                 for g, row in zip(groups, advantages) for s, a in zip(g["samples"], row)]
    per_rank = len(sequences) // world
    shares = [sequences[r::world][:per_rank] for r in range(world)]
    updates, micro = cfg.rl.updates_per_step, cfg.train.batch_size
    per_update = per_rank // updates
    loss_cfg = DapoLossConfig(eps_low=cfg.rl.eps_low, eps_high=cfg.rl.eps_high, kl_coef=cfg.rl.kl_coef)
    totals: dict[str, float] = {}

    def batch_of(chunk):
        b = policy_batch([c[0] for c in chunk], [c[1] for c in chunk], job.pad_id, loss_masks=[c[3] for c in chunk],
                         choices=[c[4] for c in chunk])
        return {k: v.to(device) for k, v in b.items()}, torch.tensor([c[2] for c in chunk], device=device)

    mine = shares[rank]
    with torch.no_grad():  # the policy that sampled (before this step's updates)
        old = [completion_logprobs(engine, batch_of(mine[i:i + micro])[0])[0] for i in range(0, per_rank, micro)]
        ref = ([completion_logprobs(ref_model, batch_of(mine[i:i + micro])[0])[0] for i in range(0, per_rank, micro)]
               if ref_model is not None else None)
    for update in range(updates):
        span = slice(update * per_update, (update + 1) * per_update)
        tokens_all = sum(sum(c[3]) for share in shares for c in share[span])  # answer tokens that carry loss
        for i in range(span.start, span.stop, micro):
            batch, adv = batch_of(mine[i:i + micro])
            logprobs, entropy = completion_logprobs(engine, batch, with_entropy=True)
            mask = batch["completion_mask"]
            loss, stats = dapo_loss(logprobs, old[i // micro], adv, mask, loss_cfg,
                                    ref[i // micro] if ref is not None else None)
            scale = float(mask.sum()) / max(tokens_all, 1) * job.train.grad_accum_steps * world
            engine.backward(loss * scale)
            engine.step()
            tokens = float(mask.sum())
            for key, value in {**stats, "loss": float(loss),
                               "entropy": float((entropy * mask).sum() / mask.sum().clamp(min=1))}.items():
                totals[key] = totals.get(key, 0.0) + value * tokens
            totals["_tokens"] = totals.get("_tokens", 0.0) + tokens
    return {k: v / max(totals["_tokens"], 1.0) for k, v in totals.items() if k != "_tokens"} | {
        "trained_tokens": totals["_tokens"]}


def rl_worker(config: dict[str, Any]) -> None:
    """Per trainer worker: build the policy in DeepSpeed, (resume,) then rollout -> update -> sync per step."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pipelines.common import setup_logging
    from pipelines.train_utils import _peak_memory_mb, _restore, _save_checkpoint, init_engine

    setup_logging()
    job: RlJob = config["job"]
    actors = config["actors"]
    train, rl = job.train, job.cfg.rl
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not train.use_gpu:
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    device = ray.train.torch.get_device()
    engine = init_engine(train, job.build_model, job.total_steps, job.cfg.seed)
    ref_model = job.build_model().to(device).eval() if rl.kl_coef > 0 else None
    state, history = _restore(engine, job, world)
    state.setdefault("cursor", 0)
    step = state["step"] // rl.updates_per_step
    if step > 0:
        sync_weights(engine, job, actors, rank)  # the rollout engines started from init_model
    while step < rl.steps:
        started = time.perf_counter()
        payload = [None, None, None]
        if rank == 0:
            payload = list(collect(job, actors, state["cursor"]))
        dist.broadcast_object_list(payload, src=0)
        groups, gen_stats, state["cursor"] = payload
        rollout_s = time.perf_counter() - started
        update = policy_update(engine, ref_model, job, groups, rank, world, device)
        step += 1
        state["step"] = step * rl.updates_per_step
        sync_s = sync_weights(engine, job, actors, rank)
        record = {"step": step, **gen_stats, **update, "lr": engine.get_lr()[0], "rollout_s": round(rollout_s, 2),
                  "sync_s": round(sync_s, 3), "step_s": round(time.perf_counter() - started, 2)}
        peak = torch.tensor([_peak_memory_mb(train.use_gpu)], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        record["peak_memory_mb"] = float(peak[0])
        last = step >= rl.steps
        if rank == 0 and (step == 1 or step % rl.eval_every_steps == 0 or last):
            record.update(validation(job, actors))
        history.append(record)
        if rank == 0:
            log.info("rl step %d/%d reward %.3f kept %.2f identity %.2f invalid %.2f clip %.3f entropy %.3f "
                     "length %.0f%s (%.1f s)", step, rl.steps, record["reward_mean"], record["kept_group_fraction"],
                     record["identity_rate"], record["invalid_rate"], record["clip_fraction"], record["entropy"],
                     record["response_length"],
                     f" val R@1 {record['val_recall@1']:.3f} N@5 {record['val_ndcg@5']:.3f}"
                     if "val_ndcg@5" in record else "", record["step_s"])
        if step % train.checkpoint_every_steps == 0 or last:
            _save_checkpoint(engine, job, dict(state, world_size=world), history, record)
        else:
            ray.train.report(record)


# ------------------------------------------------------------------------------------------------ driver


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


def plot(history: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["reward_mean"] for r in history], label="reward")
    axes[0].plot(steps, [r["rank_reward_mean"] for r in history], label="rank reward")
    axes[1].plot(steps, [r["identity_rate"] for r in history], label="identity rate")
    axes[1].plot(steps, [r["kept_group_fraction"] for r in history], label="kept groups")
    axes[1].plot(steps, [r["invalid_rate"] for r in history], label="invalid rate")
    evals = [r for r in history if "val_ndcg@5" in r]
    axes[2].plot([r["step"] for r in evals], [r["val_ndcg@5"] for r in evals], marker="o", label="val N@5")
    axes[2].plot([r["step"] for r in evals], [r["val_recall@1"] for r in evals], marker="o", label="val R@1")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


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
    prompt, eos = model_rerank_settings(init, cfg.prompt, cfg.eos_token)
    output, ckpt_name = ("models", cfg.output), f"{cfg.output}_ckpt"
    train_rows, train_counts = load_rows(run_dir, "train", cfg, cfg.max_rows)
    eval_rows, eval_counts = load_rows(run_dir, "valid", cfg, cfg.rl.eval_rows)
    fingerprint = config_fingerprint(cfg, exclude=RESUMABLE_FIELDS) | {"init_digest": model_digest(init)}
    fingerprint["rl"].pop("steps")  # more steps continue the same run
    check_previous("rl", run_dir, ckpt_name, output, fingerprint, cfg.overwrite)
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
    actor_cls = ray.remote(num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor)(RolloutWorker)
    actors = [actor_cls.remote(cfg.run_dir, init, prompt.model_dump(mode="json"), eos, cfg.model_dump(mode="json"))
              for _ in range(r.actors)]
    job = RlJob(cfg=cfg, build_model=partial(load_policy, init, "bfloat16" if t.precision == "bf16" else "float32"),
                train_rows=train_rows, eval_rows=eval_rows, pad_id=tokenizer.pad_token_id,
                extra_files=tokenizer_files(tokenizer) | {
                    RERANK_SETTINGS: json.dumps(settings_json(prompt, eos), indent=2).encode()})
    trainer = TorchTrainer(
        rl_worker, train_loop_config={"job": job, "actors": actors},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
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
    publish_checkpoint(result.checkpoint, run_dir, *output)
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
