"""The RL stage's trainer workers (Ray Train + DeepSpeed): per step, rank 0 collects rollout groups from the
rollout actors (dynamic sampling), every rank takes its share of the DAPO update, and the new weights go into the
live engines (`pipelines.weight_sync.WeightPusher`); validation re-ranks a held-out slice greedily. The driver
(`pipelines/rl.py`) starts `rl_worker` on every trainer worker.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.train_utils import TrainSection
from rec.io import RunDir

log = logging.getLogger("gr2.rl")


@dataclass
class RlJob:
    """What `rl_worker` trains; pickled to the Ray Train workers (with the rollout actor handles)."""

    cfg: Any
    """The stage's `pipelines.rl.RlConfig`."""
    build_model: Any
    train_rows: list[dict]
    eval_rows: list[dict]
    pad_id: int
    extra_files: dict[str, bytes] = field(default_factory=dict)
    stage: str = "rl"

    def __post_init__(self) -> None:
        # Built on the driver. Ray Train workers run in a working directory of their own (Ray's session folder),
        # where a relative run_dir would put the published model.
        self.cfg = self.cfg.model_copy(update={"run_dir": absolute_run_dir(self.cfg.run_dir)})

    @property
    def train(self) -> TrainSection:
        return self.cfg.train.model_copy(update={"grad_accum_steps": self.cfg.grad_accum_steps})

    @property
    def total_steps(self) -> int:
        return self.cfg.rl.steps * self.cfg.rl.updates_per_step


def absolute_run_dir(run_dir: str) -> str:
    """A relative local run_dir made absolute from this process's working directory; URIs and absolute paths kept.

    >>> absolute_run_dir("s3://bucket/run"), absolute_run_dir("/data/run")
    ('s3://bucket/run', '/data/run')
    >>> absolute_run_dir("runs/tiny") == os.path.join(os.getcwd(), "runs", "tiny")
    True
    """
    return run_dir if "://" in run_dir else os.path.abspath(run_dir)


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
    """Per trainer worker: build the policy in DeepSpeed, (resume,) then rollout -> update -> push weights per step;
    at the last step rank 0 writes the HF model straight into the stage's output folder."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pipelines.common import setup_logging
    from pipelines.train_utils import init_engine, peak_memory_mb, restore, save_checkpoint
    from pipelines.weight_sync import PolicyWeights, WeightPusher

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
    state, history = restore(engine, job, world)
    state.setdefault("cursor", 0)
    pusher = WeightPusher(job.cfg.rollout.weight_sync, actors, rank, config.get("tp_sizes"))
    weights = PolicyWeights(engine.module, train.zero_stage, rank)
    step = state["step"] // rl.updates_per_step
    if step > 0:
        pusher.push(weights)  # the rollout engines started from init_model
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
        pushed = pusher.push(weights)
        record = {"step": step, **gen_stats, **update, "lr": engine.get_lr()[0], "rollout_s": round(rollout_s, 2),
                  "sync_s": round(pushed["push_s"], 3), "step_s": round(time.perf_counter() - started, 2)}
        peak = torch.tensor([peak_memory_mb(train.use_gpu)], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        record["peak_memory_mb"] = float(peak[0])
        last = step >= rl.steps
        if rank == 0 and (step == 1 or step % rl.eval_every_steps == 0 or last):
            val_started = time.perf_counter()
            record.update(validation(job, actors))
            record["validation_s"] = round(time.perf_counter() - val_started, 2)
        waited = rollout_s + record.get("validation_s", 0.0)
        if rank == 0 and world > 1 and waited > 0.5 * train.process_group_timeout_s:
            log.warning("rl: ranks 1..%d waited %.0f s for rollouts + validation, over half of "
                        "train.process_group_timeout_s=%d; raise it before a longer step times the run out",
                        world - 1, waited, train.process_group_timeout_s)
        history.append(record)
        if rank == 0:
            log.info("rl step %d/%d reward %.3f kept %.2f identity %.2f invalid %.2f clip %.3f entropy %.3f "
                     "length %.0f%s (%.1f s, push %.2f s)", step, rl.steps, record["reward_mean"],
                     record["kept_group_fraction"], record["identity_rate"], record["invalid_rate"],
                     record["clip_fraction"], record["entropy"], record["response_length"],
                     f" val R@1 {record['val_recall@1']:.3f} N@5 {record['val_ndcg@5']:.3f}"
                     if "val_ndcg@5" in record else "", record["step_s"], record["sync_s"])
        if step % train.checkpoint_every_steps == 0 or last:
            publish = (RunDir.open(job.cfg.run_dir), ("models", job.cfg.output)) if last else None
            save_checkpoint(engine, job, dict(state, world_size=world), history, record, publish_to=publish)
        else:
            ray.train.report(record)
