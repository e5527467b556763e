"""Shared plumbing for the stage entry points: caches, logging, CLI, Ray start-up.

This is one of the few places that touches Ray; `rec/` stays Ray-free.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import Field

from pipelines.lineage import changed_inputs_message, inputs_changed
from rec.config import ConfigError, Section, StageConfig, load_config
from rec.data import DataError
from rec.io import RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]
C = TypeVar("C", bound=StageConfig)

log = logging.getLogger("gr2")


def cache_dir() -> Path:
    """One directory for every cache (HF, torch extensions, vLLM, Triton, Ray temp): `$GR2_CACHE_DIR` or `.cache/`."""
    return Path(os.environ.get("GR2_CACHE_DIR", REPO_ROOT / ".cache")).resolve()


def setup_env() -> None:
    """Point every library cache into `cache_dir()` (unless the user already set it) and keep the hub offline."""
    root = cache_dir()
    defaults = {
        "HF_HOME": root / "hf",
        "TORCH_EXTENSIONS_DIR": root / "torch_extensions",
        "VLLM_CACHE_ROOT": root / "vllm",
        "TRITON_CACHE_DIR": root / "triton",
        "MPLCONFIGDIR": root / "matplotlib",
        "RAY_TMPDIR": root / "ray",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, str(value))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("GR2_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def parse_cli(cls: type[C], description: str, argv: list[str] | None = None) -> C:
    """`--config <yaml> [key=value ...]` -> a validated config; a bad config exits with the message, no traceback."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=False, help="YAML config file (pipelines/configs/<preset>/<stage>.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested sections")
    args = parser.parse_args(argv)
    setup_env()
    setup_logging()
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError)


def exit_on_user_error(fn):
    """Run a stage's `main`: input and config errors (which name the file, line or field) exit 2 with the message
    and no traceback; anything else is a bug and keeps its traceback."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (StageOutputsMismatch, *USER_ERRORS) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def local_cpus(requested: int | None, reserved: float, what: str) -> int:
    """Logical CPUs for a private local Ray: `requested`, or what the actors/workers reserve plus one.

    The extra CPU is for Ray Data's read and split tasks: if actors hold every CPU, those tasks never get scheduled
    and the pipeline waits forever, so a `requested` count without that headroom is refused up front.

    >>> local_cpus(None, 2.0, "2 actors x 1 CPU")
    3
    """
    needed = math.ceil(reserved) + 1
    if requested is None:
        return needed
    if requested < needed:
        raise ConfigError(
            f"num_cpus={requested} leaves no CPU for Ray Data's own tasks: {what} reserve {reserved:g}; "
            f"set num_cpus >= {needed} (logical CPUs may exceed the physical cores) or reserve fewer"
        )
    return requested


def init_ray(num_cpus: int | None = None) -> None:
    """Attach to the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a private local one."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        setup_env()
        temp = Path(os.environ["RAY_TMPDIR"])
        temp.mkdir(parents=True, exist_ok=True)
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls every few seconds
        # (without it, it logs a warning each time); it listens on loopback only.
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
            _temp_dir=str(temp),
        )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


class StageOutputsMismatch(RuntimeError):
    """A run directory already holds this stage's outputs, written by a different config."""


def already_done(run, marker: tuple[str, ...], fingerprint: dict, overwrite: bool, stage: str,
                 config_cls: type | None = None) -> bool:
    """True when `marker` (a stage's final file) exists and was written by the same config: skip the stage.

    The marker JSON must hold the fingerprint under "config". A different fingerprint is an error unless
    `overwrite` is set, so a rerun never silently mixes outputs of two configs. With `config_cls`, fields added
    later that hold their neutral value are compared as absent (rec.config.same_fingerprint).
    """
    from rec.config import same_fingerprint

    if overwrite or not run.exists(*marker):
        return False
    previous = run.read_json(*marker).get("config")
    if same_fingerprint(config_cls, previous, fingerprint):
        log.info("%s: %s already written with this config; skipping (overwrite=true to redo)", stage, "/".join(marker))
        return True
    raise config_mismatch(stage, run.path(*marker), previous or {}, fingerprint)


def config_mismatch(stage: str, path: str, previous: dict, current: dict) -> StageOutputsMismatch:
    """The error for outputs at `path` written by another config, naming the fields that differ.

    >>> str(config_mismatch("sid", "/r/sid/report.json", {"levels": 3, "seed": 0}, {"levels": 4, "seed": 0}))[:60]
    'sid: /r/sid/report.json was written by a different config (f'
    """
    if inputs_changed(previous, current):
        return StageOutputsMismatch(changed_inputs_message(stage, path, previous, current))
    changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    return StageOutputsMismatch(
        f"{stage}: {path} was written by a different config (fields differ: {', '.join(changed)}); "
        "use a new run_dir, or pass overwrite=true to replace it (later stages must then be rerun too)"
    )


# --- vLLM engines in a Ray Data actor pool (prerank, traces, evaluation) ---------------------------------------


class EngineSection(Section):
    """vLLM engine arguments (one engine per actor)."""

    max_model_len: int = Field(default=1024, ge=32)
    """Longest prompt + answer; longer histories keep their most recent items."""
    kv_cache_memory_bytes: int | None = Field(default=256 * 2**20, ge=1)
    """KV cache per engine (required on CPU); null lets a GPU engine size it from gpu_memory_utilization."""
    dtype: str = "float32"
    """Model dtype in the engine (float32 on CPU, bfloat16 on GPU)."""
    block_size: int | None = Field(default=32, ge=1)
    """KV block size; the prefix cache shares whole blocks (CPU attention needs a multiple of 32)."""
    enforce_eager: bool = True
    """No graph capture (CPU needs it; GPUs run faster with false)."""
    in_process: bool | None = None
    """Run the engine core in the actor's own process (true) or in vLLM's multi-process engine (false: what GPUs
    run; every argument then crosses msgpack and the engine reads its environment in a child process). null: in
    process on CPU (starts in ~2 s instead of ~20 s), multi-process on GPUs."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Any other `vllm.LLM` argument, e.g. {gpu_memory_utilization: 0.8, tensor_parallel_size: 4}."""


class EngineActorsConfig(StageConfig):
    """Fields of a stage that runs vLLM engines as a Ray Data actor pool."""

    engine: EngineSection = Field(default_factory=EngineSection)
    """vLLM engine arguments."""
    actors: int = Field(default=2, ge=1)
    """Engines in the Ray Data actor pool."""
    cpus_per_actor: float = Field(default=1.0, gt=0)
    """Logical CPUs per actor; on CPU also the number of cores its engine is bound to (rounded, at least 1)."""
    gpus_per_actor: float = Field(default=0.0, ge=0)
    """GPUs per actor (0 on CPU machines; the engine's tensor_parallel_size on GPUs)."""
    bind_cores: bool = True
    """CPU actors bind their engine to cores of their own (VLLM_CPU_OMP_THREADS_BIND) instead of all to core 0."""
    batch_size: int = Field(default=64, ge=1)
    """Rows per actor call."""
    flush_rows: int = Field(default=1024, ge=1)
    """Finished rows are saved to the stage's _parts/ at least this often (what a rerun after a crash keeps)."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs for a local Ray (null: actors x cpus_per_actor + 1); ignored when attaching to a cluster."""

    RESOURCE_FIELDS: ClassVar[set[str]] = {"run_dir", "overwrite", "num_cpus", "actors", "cpus_per_actor",
                                           "gpus_per_actor", "bind_cores", "batch_size", "flush_rows"}
    """Fields that decide how fast, not what: they may change between a run and its resumption."""


class StreamingActorsConfig(EngineActorsConfig):
    """A pool stage whose actors answer re-rank prompts (traces, evaluate): static or continuous batching."""

    continuous: bool = True
    """Each actor runs vLLM's async engine (`AsyncLLM`) and keeps `concurrent_batches` of its batches in flight,
    every prompt an engine request of its own: a request joins the running batch when it is sent and leaves it when
    its answer ends (continuous batching), so one batch's long answers do not leave the engine half empty, and a
    row's next round is sent as soon as its previous samples are back. false: one blocking `LLM.generate` per
    batch and round (the static path, kept for comparison: `bench/traces_throughput.py`)."""
    concurrent_batches: int = Field(default=2, ge=1)
    """Continuous only: batches one actor works on at once (Ray Data's `max_concurrency` of an async actor), so
    that the engine has work while a batch's last rows finish; rows in flight per engine = this x batch_size."""

    RESOURCE_FIELDS: ClassVar[set[str]] = EngineActorsConfig.RESOURCE_FIELDS | {"continuous", "concurrent_batches"}


def engine_start_args(engine: EngineSection, cpus: float, gpus: float, bind_cores: bool = True,
                      **engine_args: Any) -> tuple[dict[str, Any], str | None, Any]:
    """The engine arguments of one Ray actor (a pool actor or a Serve replica), as `start_llm` and `start_async_llm`
    take them, with the cores they bind the engine to and the lock on those cores (None, None: no binding). CPU
    actors bind the engine to cores of their own (the lock is held for the actor's life) and run it in-process
    (starts in ~2 s) unless `engine.in_process` says otherwise; GPU actors use vLLM's default engine process and
    executor, which spreads `tensor_parallel_size` over the actor's GPUs."""
    from rec.engines.vllm_runtime import claim_cpu_cores

    claim = claim_cpu_cores(max(1, round(cpus))) if bind_cores and gpus == 0 else None
    cores, lock = claim if claim else (None, None)
    in_process = engine.in_process if engine.in_process is not None else gpus == 0
    args = dict(max_model_len=engine.max_model_len, kv_cache_memory_bytes=engine.kv_cache_memory_bytes,
                dtype=engine.dtype, cpu_cores=cores, block_size=engine.block_size, enforce_eager=engine.enforce_eager,
                in_process=in_process, **{**engine.extra, **engine_args})
    return args, cores, lock


def start_engine(engine: EngineSection, model: str, cpus: float, gpus: float, bind_cores: bool = True,
                 **engine_args: Any):
    """A vLLM engine (`vllm.LLM`) for one Ray actor, started with `engine_start_args`: (llm, cores or None, lock)."""
    from rec.engines.vllm_runtime import start_llm

    args, cores, lock = engine_start_args(engine, cpus, gpus, bind_cores, **engine_args)
    return start_llm(model, **args), cores, lock


def start_actor_engine(cfg: EngineActorsConfig, model: str, **engine_args: Any):
    """`start_engine` with a pool stage's actor resources."""
    return start_engine(cfg.engine, model, cfg.cpus_per_actor, cfg.gpus_per_actor, cfg.bind_cores, **engine_args)


def start_sid_ranker(run_dir: RunDir, model: str, codebook_size: int, engine: EngineSection, backend: str,
                     num_beams: int, top_n: int, cpus: float, gpus: float, bind_cores: bool = True):
    """The constrained beam-search ranker over `model` and the run's SID map (prerank actors, the serving Ranker):
    (rec.engines.sid_ranker.SidRanker, core lock or None). `backend` is `torch` (the batched search on the model:
    on the actor's GPU when it has one, else on `cpus` threads), `vllm` (an engine), or `hf` (the reference)."""
    from transformers import AutoConfig, AutoTokenizer

    from rec.engines.sid_ranker import SidRanker
    from rec.model import sid_softmax_of

    sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
    codes = np.array(sid_map["codes"], dtype=np.int64)
    tokenizer = AutoTokenizer.from_pretrained(model)
    args = dict(tokenizer=tokenizer, item_ids=sid_map["item_id"], codes=codes, codebook_size=codebook_size,
                num_beams=num_beams, top_n=top_n, max_model_len=engine.max_model_len,
                sid_softmax=sid_softmax_of(AutoConfig.from_pretrained(model)))
    if backend in ("torch", "hf"):
        import torch

        from rec.model import load_student

        torch.set_num_threads(max(1, round(cpus)))
        device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
        student = load_student(model, dtype=getattr(torch, engine.dtype))[1].eval().to(device)
        log.info("SID ranker: %s search on %s for %s", backend, device, model)
        return SidRanker(model=student, model_search=backend, threads=max(1, round(cpus)), **args), None
    llm, bound, lock = start_engine(engine, model, cpus, gpus, bind_cores)
    log.info("SID ranker: vLLM engine for %s on cores %s", model, bound or "-")
    return SidRanker(llm=llm, **args), lock


def _reranker_inputs(run_dir: RunDir, model: str, prompt, eos_token: str, sampling):
    """(tokenizer, PromptBuilder, logits processors, eos id) of a re-ranker over `model`."""
    from transformers import AutoTokenizer

    from rec.engines.reranker import RANKING_PROCESSOR
    from rec.rerank import PromptBuilder, eos_token_id

    tokenizer = AutoTokenizer.from_pretrained(model)
    processors = [RANKING_PROCESSOR] if sampling.constrained else []
    return (tokenizer, PromptBuilder.for_run(tokenizer, run_dir, prompt), processors,
            eos_token_id(tokenizer, eos_token, model))


def start_reranker(run_dir: RunDir, model: str, prompt, eos_token: str, sampling, engine: EngineSection, cpus: float,
                   gpus: float, bind_cores: bool = True, seed: int = 0, **engine_args: Any):
    """The re-ranker over a vLLM engine for `model` (evaluation actors, RL rollouts): (rec.engines.reranker.Reranker,
    cores or None, core lock or None). `prompt` is a RerankPromptSection, `sampling` a RerankSamplingSection;
    `engine_args` go to vllm.LLM."""
    from rec.engines.reranker import Reranker, RerankGenerator

    tokenizer, prompts, processors, eos_id = _reranker_inputs(run_dir, model, prompt, eos_token, sampling)
    llm, bound, lock = start_engine(engine, model, cpus, gpus, bind_cores, logits_processors=processors, seed=seed,
                                    **engine_args)
    generator = RerankGenerator(tokenizer, eos_id, sampling, llm=llm, answer=prompts.section.answer,
                                top=prompts.section.answer_top)
    return Reranker(prompts, generator, engine.max_model_len), bound, lock


def start_async_reranker(run_dir: RunDir, model: str, prompt, eos_token: str, sampling, engine: EngineSection,
                         cpus: float, gpus: float, bind_cores: bool = True, seed: int = 0, **engine_args: Any):
    """`start_reranker` on vLLM's async engine (the serving ReRanker: requests join the running batch as they come
    and are aborted at their deadline): (rec.engines.async_reranker.AsyncReranker, cores or None, core lock or
    None). Same arguments and environment as `start_reranker`'s engine, except that the engine core always runs in
    a child process (`engine.in_process: true` is refused); its load (`AsyncReranker.load`) follows every step."""
    from rec.engines.async_reranker import AsyncReranker, EngineLoad, start_async_llm
    from rec.engines.reranker import RerankDecoding

    if engine.in_process:
        raise ConfigError("engine.in_process is true, but vLLM's async engine always runs its engine core in a "
                          "child process: set it to null (or false)")
    tokenizer, prompts, processors, eos_id = _reranker_inputs(run_dir, model, prompt, eos_token, sampling)
    load = EngineLoad()
    args, cores, lock = engine_start_args(engine, cpus, gpus, bind_cores, logits_processors=processors, seed=seed,
                                          **engine_args)
    del args["in_process"]  # always a child process
    llm = start_async_llm(model, stat_loggers=[load.stat_logger()], **args)
    decoding = RerankDecoding(tokenizer, eos_id, sampling, prompts.section.answer, prompts.section.answer_top)
    return AsyncReranker(prompts, decoding, engine.max_model_len, llm, load), cores, lock


def stream_actor_pool(cfg: EngineActorsConfig, rows: pa.Table, actor_cls: type, ctor_kwargs: dict[str, Any]):
    """Run `actor_cls` (a callable class: pyarrow batch -> pyarrow batch) over `rows` as a Ray Data actor pool of
    `cfg.actors` actors; yields result batches as they finish (starts a local Ray unless RAY_ADDRESS is set)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    init_ray(local_cpus(cfg.num_cpus, cfg.actors * cfg.cpus_per_actor, "the vLLM actors"))
    blocks = [rows.slice(start, cfg.batch_size) for start in range(0, rows.num_rows, cfg.batch_size)]
    compute = ActorPoolStrategy(size=cfg.actors)
    if inspect.iscoroutinefunction(actor_cls.__call__):
        # an async actor: Ray Data runs its calls on one event loop, `concurrent_batches` at a time, and keeps as
        # many more queued on the actor so that a finished batch is replaced at once
        batches = getattr(cfg, "concurrent_batches", 1)
        compute = ActorPoolStrategy(size=cfg.actors, max_concurrent_calls_per_actor=batches,
                                    max_tasks_in_flight_per_actor=2 * batches)
    results = ray.data.from_arrow(blocks).map_batches(
        actor_cls,
        fn_constructor_kwargs=ctor_kwargs,
        compute=compute,
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
    )
    yield from results.iter_batches(batch_size=None, batch_format="pyarrow")


def model_digest(model: str) -> str:
    """Identifies a local checkpoint: names and sizes of its files, contents of the small ones (configs, reports).
    A hub id (no such directory) is its own digest."""
    digest = hashlib.sha256()
    fs, root = pafs.LocalFileSystem(), model
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return model
    infos = sorted(fs.get_file_info(pafs.FileSelector(root, recursive=True)), key=lambda info: info.path)
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        digest.update(f"{info.path[len(root):]}\t{info.size}\n".encode())
        if info.size < 1 << 20:
            with fs.open_input_stream(info.path) as src:
                digest.update(src.read())
    return digest.hexdigest()[:16]


class Parts:
    """A stage's finished-so-far results: Parquet files `<stage_dir>/_parts/<name>-<config key>/part-*.parquet`.

    Each file is written atomically, so what a crashed run flushed is whole; a rerun with the same config reads
    them back and skips those rows; another config gets another directory.
    """

    def __init__(self, run_dir: RunDir, stage_dir: str, name: str, fingerprint: dict):
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
        self.run_dir, self.location = run_dir, (stage_dir, f"_parts/{name}-{key}")

    def read(self, columns: list[str] | None = None) -> pa.Table | None:
        import pyarrow.parquet as pq

        fs = self.run_dir.fs
        infos = fs.get_file_info(pafs.FileSelector(self.run_dir.path(*self.location), allow_not_found=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith("part-"))
        if not files:
            return None
        return pa.concat_tables([pq.read_table(f, filesystem=fs, columns=columns) for f in files],
                                promote_options="default")

    def write(self, table: pa.Table) -> None:
        self.run_dir.write_parquet(table, *self.location, f"part-{uuid.uuid4().hex}.parquet")
