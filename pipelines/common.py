"""Shared plumbing for the stage entry points: caches, logging, CLI, Ray start-up.

This is one of the few places that touches Ray; `rec/` stays Ray-free.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import TypeVar

from rec.config import ConfigError, StageConfig, load_config
from rec.data import DataError

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


def already_done(run, marker: tuple[str, ...], fingerprint: dict, overwrite: bool, stage: str) -> bool:
    """True when `marker` (a stage's final file) exists and was written by the same config: skip the stage.

    The marker JSON must hold the fingerprint under "config". A different fingerprint is an error unless
    `overwrite` is set, so a rerun never silently mixes outputs of two configs.
    """
    if overwrite or not run.exists(*marker):
        return False
    previous = run.read_json(*marker).get("config")
    if previous == fingerprint:
        log.info("%s: %s already written with this config; skipping (overwrite=true to redo)", stage, "/".join(marker))
        return True
    raise config_mismatch(stage, run.path(*marker), previous or {}, fingerprint)


def config_mismatch(stage: str, path: str, previous: dict, current: dict) -> StageOutputsMismatch:
    """The error for outputs at `path` written by another config, naming the fields that differ.

    >>> str(config_mismatch("sid", "/r/sid/report.json", {"levels": 3, "seed": 0}, {"levels": 4, "seed": 0}))[:60]
    'sid: /r/sid/report.json was written by a different config (f'
    """
    changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    return StageOutputsMismatch(
        f"{stage}: {path} was written by a different config (fields differ: {', '.join(changed)}); "
        "use a new run_dir, or pass overwrite=true to replace it (later stages must then be rerun too)"
    )
