"""Ray Train + DeepSpeed plumbing shared by the training stages (midtrain now; SFT and RL reuse it).

One generic per-worker loop (`train_worker`) trains whatever a `TrainJob` describes: how to build the model on a
worker, the loss of a batch, how rows become a batch, and which extra files (the tokenizer) go into every
checkpoint. `fit` wires it into a `TorchTrainer` (Ray Train V2) with the rows as a Ray Dataset, split across the
workers by `ray.train.get_dataset_shard`; DeepSpeed ZeRO (stage from config, gloo on CPU, NCCL on GPU) does the
data parallelism.

Checkpoints: every `checkpoint_every_steps`, and at the last step, each worker reports one directory, merged by
Ray Train into `<storage>/<name>/checkpoint_.../`: rank 0 writes a complete HF checkpoint (safetensors, config,
tokenizer), `trainer_state.json`, `train_log.jsonl` and the same records as TensorBoard scalars under `tb/`; every rank
writes its DeepSpeed shard under `deepspeed/` (optimizer and scheduler state, so a resumed run continues exactly where
it stopped). A rerun with the same storage and name resumes from the latest checkpoint (Ray Train V2 restores its
checkpoint manager from storage).
`publish_checkpoint` copies the HF files (not the DeepSpeed shards) of a checkpoint to a stage's output folder;
the RL stage publishes straight from the trainer instead (`save_checkpoint(..., publish_to=...)`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from rec.config import Section
from rec.io import RunDir

log = logging.getLogger("gr2.train")

DS_TAG = "state"
DEEPSPEED_DIR = "deepspeed"
TRAINER_STATE = "trainer_state.json"
TRAIN_LOG = "train_log.jsonl"
TENSORBOARD_DIR = "tb"


class TrainSection(Section):
    """Optimisation, parallelism and checkpointing of a Ray Train + DeepSpeed run."""

    num_workers: int = Field(default=2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """Ray CPUs per worker; on CPU also its torch thread count (rounded down, at least 1)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers over gloo."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage (2: shard optimizer state and gradients; 3: also parameters)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 on CPU; bf16 on GPU presets."""
    torch_adam: bool = True
    """Use torch's AdamW inside DeepSpeed (CPU: avoids compiling DeepSpeed's CPU Adam extension)."""
    batch_size: int = Field(default=8, ge=1)
    """Rows per worker per micro-batch."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, down to `min_lr_ratio * lr` at the last step."""
    warmup_steps: int = Field(default=20, ge=0)
    """Linear warm-up from 0 to `lr`."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final learning rate as a fraction of `lr`."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Gradient clipping norm."""
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training rows (ignored when max_steps is set)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to train for; overrides epochs. Raising it and rerunning continues from the last checkpoint."""
    checkpoint_every_steps: int = Field(default=200, ge=1)
    """Save a resumable checkpoint every this many optimizer steps (and always at the last step)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept in storage (older ones are deleted by Ray Train)."""
    log_every_steps: int = Field(default=10, ge=1)
    """Log loss, learning rate and tokens/s every this many optimizer steps (rank 0)."""
    shuffle_buffer_rows: int = Field(default=256, ge=0)
    """Rows in each worker's local shuffle buffer, reseeded every epoch (0: keep the order)."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker-group restarts Ray Train attempts after a crash (each resumes from the latest checkpoint)."""
    process_group_timeout_s: int = Field(default=1800, ge=60)
    """Seconds a collective (gloo/NCCL) may wait before the run fails: longer than the longest stretch in which some
    ranks wait for others (RL: ranks 1..N wait while rank 0 runs a rollout batch and validation)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of keeping them (HF models): far less memory for
    long sequences, ~30 % more compute."""

    @model_validator(mode="after")
    def _check(self) -> TrainSection:
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("precision=bf16 needs use_gpu=true; CPU training runs in fp32")
        return self

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config dict for this section (per-worker micro-batch, ZeRO stage, AdamW, clipping)."""
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.zero_stage == 3:
            # lets rank 0 gather the full weights for the HF checkpoint
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        return {
            "train_micro_batch_size_per_gpu": self.batch_size,
            "gradient_accumulation_steps": self.grad_accum_steps,
            "gradient_clipping": self.max_grad_norm,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": self.lr,
                    "betas": list(self.betas),
                    "eps": 1e-8,
                    "weight_decay": self.weight_decay,
                    "torch_adam": self.torch_adam,
                },
            },
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def steps_for(self, rows: int) -> tuple[int, int]:
        """(optimizer steps per epoch, total steps) for `rows` training rows split over the workers."""
        per_worker = rows // self.num_workers
        steps_per_epoch = per_worker // (self.batch_size * self.grad_accum_steps)
        if steps_per_epoch == 0:
            raise ValueError(
                f"{rows} training rows give no full optimizer step with {self.num_workers} workers x batch_size "
                f"{self.batch_size} x grad_accum_steps {self.grad_accum_steps}; use more data or a smaller batch"
            )
        total = self.max_steps or max(1, math.ceil(self.epochs * steps_per_epoch))
        return steps_per_epoch, total


def lr_lambda(train: TrainSection, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at each optimizer step: linear warm-up, then cosine/linear decay or constant."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        if train.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if train.lr_schedule == "cosine" else 1 - progress
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * decay

    return factor


@dataclass
class TrainJob:
    """What `train_worker` trains; everything here is pickled to the workers."""

    train: TrainSection
    total_steps: int
    steps_per_epoch: int
    build_model: Callable[[], torch.nn.Module]
    """Called on every worker (seeded) to build or load the model."""
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]
    """(model, batch) -> (loss to minimise, tokens processed, for throughput)."""
    collate_fn: Callable[[dict[str, Any]], dict[str, torch.Tensor]]
    """A Ray Data numpy batch -> tensors."""
    extra_files: dict[str, bytes] = field(default_factory=dict)
    """Files written into every checkpoint next to the weights (the tokenizer)."""
    seed: int = 0
    stage: str = "train"
    eval_rows: list[dict[str, Any]] | None = None
    """Held-out rows: their mean loss is logged as `eval_loss` every `eval_every_steps` and at the last step."""
    eval_every_steps: int | None = None


def _numpy_collate(fn: Callable[[dict[str, Any]], dict[str, torch.Tensor]]):
    """Wrap a plain collate function in the collate class Ray Data expects (plain functions are deprecated)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            return fn(batch)

    return Collate()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def full_state_dict(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere). Call on every rank: ZeRO-3 gathers collectively."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if rank == 0 else None


def save_checkpoint(engine, job: TrainJob, state: dict[str, Any], history: list[dict], metrics: dict,
                    publish_to: tuple[RunDir, tuple[str, ...]] | None = None) -> None:
    """A resumable checkpoint through Ray Train (call on every rank). With `publish_to` (the last step), rank 0 also
    writes the HF files it just saved straight into that run-dir folder, so the stage's model is never copied back
    out of the checkpoint (whose DeepSpeed shards hold ~12 bytes of optimizer state per parameter)."""
    import ray.train
    import torch.distributed as dist

    rank = dist.get_rank()
    directory = tempfile.mkdtemp(prefix=f"{job.stage}-ckpt-")
    try:
        # every rank writes its own optimizer shard; rank 0 also the module states
        engine.save_checkpoint(os.path.join(directory, DEEPSPEED_DIR), tag=DS_TAG)
        weights = full_state_dict(engine, job.train.zero_stage, rank)
        if rank == 0:
            engine.module.save_pretrained(directory, state_dict=weights)
            for name, data in job.extra_files.items():
                with open(os.path.join(directory, name), "wb") as out:
                    out.write(data)
            with open(os.path.join(directory, TRAINER_STATE), "w") as out:
                json.dump(state, out, indent=2)
            with open(os.path.join(directory, TRAIN_LOG), "w") as out:
                out.writelines(json.dumps(record) + "\n" for record in history)
            write_tensorboard(history, os.path.join(directory, TENSORBOARD_DIR))
            if publish_to is not None:
                publish_directory(directory, publish_to[0], *publish_to[1])
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_step_{state['step']:08d}",
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a `train_log.jsonl` field: held-out metrics under `eval/`, the rest under `train/`.

    >>> tensorboard_tag("loss"), tensorboard_tag("eval_loss"), tensorboard_tag("val_ndcg@5")
    ('train/loss', 'eval/eval_loss', 'eval/val_ndcg@5')
    """
    return f"eval/{key}" if key.startswith(("eval_", "val_")) else f"train/{key}"


def write_tensorboard(history: list[dict], directory: str) -> str:
    """Every number of every record (but `step`, the x axis) as a TensorBoard scalar at that record's step, in one
    new event file under `directory`; returns the folder. Written whole from the history at each checkpoint (like
    `train_log.jsonl`), so a resumed run's curves hold each step once."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=directory) as writer:
        for record in history:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    writer.add_scalar(tensorboard_tag(key), value, global_step=record["step"])
    return directory


def restore(engine, job: TrainJob, world_size: int) -> tuple[dict[str, Any], list[dict]]:
    import ray.train

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens": 0, "world_size": world_size}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return state, []
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, TRAINER_STATE)) as src:
            state = json.load(src)
        if state["world_size"] != world_size:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} was written by {state['world_size']} workers, this run has "
                f"{world_size}; ZeRO shards cannot be re-split: rerun with num_workers={state['world_size']}, "
                "or overwrite=true to start again"
            )
        engine.load_checkpoint(os.path.join(directory, DEEPSPEED_DIR), tag=DS_TAG)
        with open(os.path.join(directory, TRAIN_LOG)) as src:
            history = [json.loads(line) for line in src if line.strip()]
    log.info("%s: resumed from %s at step %d", job.stage, checkpoint.path, state["step"])
    state["resumed_from_step"] = state["step"]
    return state, history


def peak_memory_mb(use_gpu: bool) -> float:
    """This worker's peak memory so far: CUDA allocations on GPU, the process's peak resident set on CPU."""
    if use_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _eval_loss(engine, job: TrainJob, rank: int, world_size: int, device) -> float | None:
    """Mean loss over the held-out rows. Every rank takes the same number of rows (ZeRO-3 gathers parameters
    collectively, so all ranks must run the same forwards), and the sums are all-reduced."""
    import torch.distributed as dist

    if not job.eval_rows:
        return None
    per_rank = len(job.eval_rows) // world_size
    mine = job.eval_rows[rank::world_size][:per_rank]
    totals = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_rank, job.train.batch_size):
            chunk = mine[start:start + job.train.batch_size]
            loss, _ = job.loss_fn(engine, _to_device(job.collate_fn(chunk), device))
            totals += torch.tensor([float(loss) * len(chunk), len(chunk)], dtype=torch.float64)
    engine.train()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] else None


def init_engine(train: TrainSection, build_model: Callable[[], torch.nn.Module], total_steps: int, seed: int):
    """This worker's DeepSpeed engine around `build_model()` (seeded): ZeRO stage, AdamW, warm-up + decay schedule,
    gradient checkpointing as configured. Call inside a Ray Train worker (torch.distributed is initialised)."""
    import deepspeed

    ds_config = train.deepspeed_config()
    hf_ds_config = None
    if train.zero_stage == 3:
        # While this object lives, from_pretrained partitions weights as it loads (an 8B model never sits whole
        # on one GPU). transformers needs `accelerate` for it; a model built from a config does not.
        try:
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds_config = HfDeepSpeedConfig(ds_config)
        except ImportError as err:
            log.warning("ZeRO-3 without HfDeepSpeedConfig (%s); pretrained weights load whole on each worker", err)
    torch.manual_seed(seed)
    model = build_model()
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train, total_steps)),
    )
    engine.hf_deepspeed_config = hf_ds_config  # transformers sees ZeRO-3 (a weak reference) while the engine lives
    return engine


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker loop: build, (resume,) train to `total_steps`, log from rank 0, checkpoint as configured."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pipelines.common import setup_logging

    setup_logging()
    job: TrainJob = config["job"]
    train = job.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if not train.use_gpu:
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    device = ray.train.torch.get_device()
    engine = init_engine(train, job.build_model, job.total_steps, job.seed)
    state, history = restore(engine, job, world_size)
    shard = ray.train.get_dataset_shard("train")
    collate_fn = _numpy_collate(job.collate_fn)

    window = torch.zeros(3, dtype=torch.float64)  # loss sum, micro-batches, tokens (this rank)
    window_start: float | None = None  # set at the first batch: throughput excludes start-up
    while state["step"] < job.total_steps:
        batches = shard.iter_torch_batches(
            batch_size=train.batch_size,
            collate_fn=collate_fn,
            drop_last=True,
            local_shuffle_buffer_size=train.shuffle_buffer_rows or None,
            local_shuffle_seed=job.seed + state["epoch"] if train.shuffle_buffer_rows else None,
        )
        seen = 0
        for batch in batches:
            seen += 1
            if seen <= state["batches_in_epoch"]:
                # consumed before the checkpoint this run resumed from (the same count of batches; with a
                # shuffle buffer the rows in them can differ a little from the interrupted run's)
                continue
            if window_start is None:
                window_start = time.perf_counter()
            loss, tokens = job.loss_fn(engine, _to_device(batch, device))
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()  # asked before step() advances the counter
            engine.step()
            state["batches_in_epoch"] = seen
            window += torch.tensor([float(loss.detach()), 1.0, float(tokens)], dtype=torch.float64)
            if not boundary:
                continue
            state["step"] += 1
            step = state["step"]
            last = step >= job.total_steps
            evaluate = bool(job.eval_every_steps) and (step % job.eval_every_steps == 0 or last)
            if step % train.log_every_steps == 0 or step % train.checkpoint_every_steps == 0 or evaluate or last:
                totals = window.clone()
                dist.all_reduce(totals)
                elapsed = time.perf_counter() - window_start
                state["tokens"] += int(totals[2])
                peak = torch.tensor([peak_memory_mb(train.use_gpu)], dtype=torch.float64)
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                record = {
                    "step": step,
                    "epoch": state["epoch"] + seen / max(1, job.steps_per_epoch * train.grad_accum_steps),
                    "loss": float(totals[0] / max(1.0, float(totals[1]))),
                    "lr": engine.get_lr()[0],
                    "tokens_per_s": float(totals[2]) / max(elapsed, 1e-9),
                    "tokens": state["tokens"],
                    "peak_memory_mb": float(peak[0]),
                }
                if evaluate:
                    record["eval_loss"] = _eval_loss(engine, job, rank, world_size, device)
                history.append(record)
                if rank == 0:
                    log.info(
                        "%s step %d/%d epoch %.2f loss %.4f lr %.2e tokens/s %.0f%s",
                        job.stage, step, job.total_steps, record["epoch"], record["loss"], record["lr"],
                        record["tokens_per_s"],
                        f" eval_loss {record['eval_loss']:.4f}" if record.get("eval_loss") is not None else "",
                    )
                window.zero_()
                if step % train.checkpoint_every_steps == 0 or last:
                    save_checkpoint(engine, job, dict(state, world_size=world_size), history, record)
                else:
                    ray.train.report(record)
                window_start = time.perf_counter()  # throughput excludes logging and checkpointing
            if last:
                return
        if seen == 0:
            raise RuntimeError(f"{job.stage}: worker {rank} got no full batch of {train.batch_size} rows")
        state["epoch"] += 1
        state["batches_in_epoch"] = 0


def fit(job: TrainJob, dataset, storage_path: str, name: str, storage_filesystem=None):
    """Run `train_worker` on `job.train.num_workers` Ray Train workers over `dataset`; returns the Ray Result.

    Rerunning with the same `storage_path` and `name` resumes from the latest checkpoint stored there.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = job.train
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo", timeout_s=train.process_group_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
        datasets={"train": dataset},
    )
    return trainer.fit()


def check_previous(stage: str, run_dir: RunDir, ckpt_name: str, output: tuple[str, ...], fingerprint: dict,
                   overwrite: bool, config_cls: type | None = None) -> None:
    """Refuse to resume or overwrite the checkpoints of a different config (overwrite=true deletes them and the
    published model instead); record this config next to the checkpoints. With `config_cls` (the stage's config
    class) a field added later that holds its neutral value matches a fingerprint recorded with or without it."""
    from pipelines.common import config_mismatch
    from rec.config import same_fingerprint

    marker = ("models", ckpt_name, "fingerprint.json")
    if overwrite:
        for parts in (("models", ckpt_name), output):
            if run_dir.exists(*parts):
                run_dir.fs.delete_dir(run_dir.path(*parts))
    elif run_dir.exists(*marker):
        previous = run_dir.read_json(*marker)
        if not same_fingerprint(config_cls, previous, fingerprint):
            raise config_mismatch(stage, run_dir.path(*marker), previous, fingerprint)
    run_dir.write_json(fingerprint, *marker)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files `save_pretrained` writes for `tokenizer`, by name (shipped into every checkpoint)."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir())}


def count_parameters(run_dir: RunDir, *parts: str) -> int | None:
    """Parameters in the published safetensors (tied weights are stored once)."""
    from safetensors import safe_open

    try:
        path = run_dir.local_path(*parts, "model.safetensors")
    except ValueError:
        return None
    if not os.path.exists(path):
        return None
    with safe_open(path, framework="pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def publish_checkpoint(checkpoint, run_dir: RunDir, *parts: str) -> str:
    """Copy a checkpoint's HF files (weights, config, tokenizer, logs, `tb/`) to `parts`, reading them straight from
    the checkpoint's storage: the DeepSpeed shards (optimizer state) are never downloaded."""
    return _publish_files(checkpoint.filesystem, checkpoint.path, run_dir, *parts)


def publish_directory(directory: str, run_dir: RunDir, *parts: str) -> str:
    """Copy a local folder's HF files (not its DeepSpeed shards) to `parts` of the run dir (see `_publish_files`)."""
    import pyarrow.fs as pafs

    return _publish_files(pafs.LocalFileSystem(), directory, run_dir, *parts)


def _publish_files(fs, root: str, run_dir: RunDir, *parts: str) -> str:
    """Every file under `root` but the DeepSpeed shards (subfolders such as `tb/` included) into a temporary sibling
    of `parts`, then renamed into place, so readers never see a half written model; an older model there is
    replaced."""
    import pyarrow.fs as pafs

    root = root.rstrip("/")
    names = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if not info.path.startswith(f"{root}/"):
            raise RuntimeError(f"listing {root} returned {info.path}, which is not under it")
        name = info.path[len(root) + 1:]
        if info.type == pafs.FileType.File and name.split("/", 1)[0] != DEEPSPEED_DIR:
            names.append(name)
    target = run_dir.path(*parts)
    parent, leaf = target.rsplit("/", 1)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{leaf}"
    run_dir.fs.create_dir(tmp, recursive=True)
    for name in sorted(names):
        if "/" in name:
            run_dir.fs.create_dir(f"{tmp}/{name.rsplit('/', 1)[0]}", recursive=True)
        with fs.open_input_stream(f"{root}/{name}") as src, run_dir.fs.open_output_stream(f"{tmp}/{name}") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
    old = None
    if run_dir.exists(*parts):
        old = f"{parent}/.old-{uuid.uuid4().hex}-{leaf}"
        run_dir.fs.move(target, old)
    run_dir.fs.move(tmp, target)
    if old is not None:
        run_dir.fs.delete_dir(old)
    return target


def read_trainer_state(run_dir: RunDir, *parts: str) -> dict[str, Any] | None:
    """`trainer_state.json` of a published model (None when there is none)."""
    if not run_dir.exists(*parts, TRAINER_STATE):
        return None
    return run_dir.read_json(*parts, TRAINER_STATE)


def read_train_log(run_dir: RunDir, *parts: str) -> list[dict[str, Any]]:
    """The logged records (step, loss, lr, tokens/s) of a published model, in order."""
    with run_dir.fs.open_input_stream(run_dir.path(*parts, TRAIN_LOG)) as src:
        return [json.loads(line) for line in src.read().decode().splitlines() if line.strip()]
