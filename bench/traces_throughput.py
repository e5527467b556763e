"""Benchmark: reject sampling of reasoning traces, Ray Data + vLLM vs a plain HF loop, and n-way vs naive rounds.

Same machine, same prompts, one run, on a run directory that holds `candidates/train.parquet` and a teacher
(e.g. after `make demo`):

1. rows/s of the `traces` stage (a Ray Data actor pool of vLLM engines, n samples per request, all rounds of a
   batch inside the actor) vs a plain Python loop over HF `generate` (the stage's `backend=hf` on one process with
   every core, one row at a time, the same n-way rounds and the same answer constraint);
2. tokens per accepted trace with n-way rounds (`samples_per_round` samples in one request per round) vs naive
   resampling (one sample per request and round, the same `max_attempts` budget): generated tokens, prompt
   tokens sent (once per request: the n samples of a request share the prompt), and their sum.

Every run writes into its own scratch run directory (inputs linked from `--run-dir`), so nothing of the source run
changes. Prints a Markdown table; writes `bench/results/traces_throughput.{json,md}`.

    .venv/bin/python bench/traces_throughput.py [--run-dir runs/tiny] [--rows 128] [--hf-rows 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from machine import other_heavy_runs  # noqa: E402

from pipelines.common import setup_env, setup_logging  # noqa: E402
from pipelines.traces import TracesConfig  # noqa: E402
from rec.config import load_config  # noqa: E402

INPUTS = ("data", "sid", "candidates", "models")


def scratch_run_dir(source: Path, root: Path, name: str) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    for part in INPUTS:
        os.symlink(source / part, run_dir / part)
    return run_dir


def pipeline(config: Path, run_dir: Path, overrides: list[str]) -> dict:
    import ray

    from pipelines.traces import run

    cfg = load_config(TracesConfig, config, [f"run_dir={run_dir}", *overrides])
    try:
        return run(cfg)
    finally:
        ray.shutdown()


def hf_loop(config: Path, run_dir: Path, overrides: list[str], rows: int, cores: int) -> dict:
    """The stage's own row logic and constraint, on HF generate in this process, one row per call."""
    from pipelines.traces import TeacherBatch, eligible_rows
    from rec.io import RunDir

    cfg = load_config(TracesConfig, config, [f"run_dir={run_dir}", "backend=hf", f"cpus_per_actor={cores}",
                                             f"max_rows={rows}", *overrides])
    run = RunDir.open(str(run_dir))
    table, _ = eligible_rows(run.read_parquet("candidates", "train.parquet"), cfg)
    teacher = TeacherBatch(str(run_dir), run.local_path("models", "midtrain"), cfg.model_dump(mode="json"))
    columns = ["row_id", "history", "candidates", "target"]
    started = time.perf_counter()
    results = [teacher(table.slice(i, 1).select(columns)).to_pylist()[0] for i in range(table.num_rows)]
    seconds = time.perf_counter() - started
    accepted = sum(r["accepted"] for r in results)
    return {"rows": len(results), "seconds": round(seconds, 2), "rows_per_second": len(results) / seconds,
            "accepted": accepted, "acceptance_rate": accepted / len(results),
            "generated_tokens_per_accepted": sum(r["generated_tokens"] for r in results) / max(accepted, 1)}


def per_accepted(stats: dict) -> dict:
    accepted = stats["accepted"] or 1
    generated = stats["generated_tokens"] / accepted
    prompt = stats["prompt_tokens_per_accepted"] or 0.0
    return {"generated": generated, "prompt": prompt, "total": generated + prompt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/tiny", help="run directory with candidates/ and models/midtrain")
    parser.add_argument("--config", default=str(REPO_ROOT / "pipelines" / "configs" / "tiny" / "traces.yaml"))
    parser.add_argument("--rows", type=int, default=128, help="rows for each pipeline run")
    parser.add_argument("--hf-rows", type=int, default=16,
                        help="rows for the HF loop (the first of those rows); 0 leaves the HF loop out")
    parser.add_argument("--no-naive", action="store_true", help="leave out the naive (n = 1) pipeline run")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "traces_throughput.json"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the traces config for every run")
    args = parser.parse_args()
    setup_env()
    setup_logging()
    source = Path(args.run_dir).resolve()
    config = Path(args.config)
    if not (source / "candidates" / "train.parquet").exists():
        raise SystemExit(f"{source} has no candidates/train.parquet: run `make demo` first")
    cfg = load_config(TracesConfig, config, [f"run_dir={source}", *args.overrides])
    n = cfg.samples_per_round
    common = ["mode=reject", f"max_rows={args.rows}", *args.overrides]
    busy = other_heavy_runs()
    with tempfile.TemporaryDirectory(prefix="gr2-bench-traces-", dir=REPO_ROOT / "runs") as tmp:
        root = Path(tmp)
        static = pipeline(config, scratch_run_dir(source, root, "static"), [*common, "continuous=false"])
        continuous = pipeline(config, scratch_run_dir(source, root, "continuous"), [*common, "continuous=true"])
        naive = (None if args.no_naive else
                 pipeline(config, scratch_run_dir(source, root, "naive"), [*common, "samples_per_round=1"]))
        hf = (hf_loop(config, scratch_run_dir(source, root, "hf"), ["mode=reject"], args.hf_rows,
                      cores=len(os.sched_getaffinity(0))) if args.hf_rows else None)
        shutil.rmtree(root, ignore_errors=True)
    busy += other_heavy_runs()
    cost = {"static": per_accepted(static), "continuous": per_accepted(continuous)}
    if naive is not None:
        cost["naive"] = per_accepted(naive)
    result = {
        "run_dir": str(source), "config": str(config), "overrides": args.overrides, "rows": args.rows,
        "hf_rows": args.hf_rows,
        "samples_per_round": n, "max_attempts": cfg.max_attempts, "actors": cfg.actors,
        "batch_size": cfg.batch_size, "concurrent_batches": cfg.concurrent_batches,
        "rows_per_s_static": static["rows_per_second"], "rows_per_s_continuous": continuous["rows_per_second"],
        "speedup_continuous_vs_static": continuous["rows_per_second"] / static["rows_per_second"],
        "acceptance_static": static["acceptance_rate"], "acceptance_continuous": continuous["acceptance_rate"],
        "generated_tokens_per_accepted_static": cost["static"]["generated"],
        "generated_tokens_per_accepted_continuous": cost["continuous"]["generated"],
        "pipeline_nway": static, "pipeline_continuous": continuous, "pipeline_naive": naive, "hf_loop": hf,
        "speedup_rows_per_second": static["rows_per_second"] / hf["rows_per_second"] if hf else None,
        "tokens_per_accepted": {"nway": cost["static"], **{k: v for k, v in cost.items() if k != "static"}},
        "ratio_nway_vs_naive": ({k: cost["static"][k] / cost["naive"][k] for k in cost["static"]}
                                if naive is not None else None),
        "other_runs_seen": sorted(set(busy)),
    }
    lines = [
        f"Reject sampling, teacher of `{source.name}`, {args.rows} rows per pipeline run"
        + (f", {args.hf_rows} rows for the HF loop" if hf else "")
        + f" (n = {n} per round, max_attempts = {cfg.max_attempts}, {cfg.actors} actor(s), batch {cfg.batch_size}, "
        f"{cfg.concurrent_batches} batches in flight when continuous).",
        "",
        "| run | rows | rows/s | acceptance | attempts mean | generated tok / accepted | prompt tok / accepted "
        "| total tok / accepted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = [("Ray Data + vLLM, n-way, static batches", static, cost["static"]),
            ("Ray Data + vLLM, n-way, continuous (AsyncLLM)", continuous, cost["continuous"])]
    if naive is not None:
        runs.append(("Ray Data + vLLM, naive (n = 1)", naive, cost["naive"]))
    for name, stats, c in runs:
        lines.append(f"| {name} | {stats['rows']} | {stats['rows_per_second']:.2f} | {stats['acceptance_rate']:.3f} | "
                     f"{stats['attempts_mean']:.2f} | {c['generated']:.0f} | {c['prompt']:.0f} | {c['total']:.0f} |")
    if hf:
        lines.append(f"| HF generate loop, n-way | {hf['rows']} | {hf['rows_per_second']:.2f} | "
                     f"{hf['acceptance_rate']:.3f} | | {hf['generated_tokens_per_accepted']:.0f} | | |")
    lines += ["", f"Continuous vs static batches: {result['speedup_continuous_vs_static']:.2f}x rows/s (each run's "
              "time includes Ray and engine start-up)."]
    if hf:
        lines.append(f"Pipeline (static) vs HF loop: {result['speedup_rows_per_second']:.1f}x rows/s.")
    if naive is not None:
        ratio = result["ratio_nway_vs_naive"]
        lines.append(f"n-way vs naive, per accepted trace: generated tokens {ratio['generated']:.2f}x, prompt tokens "
                     f"{ratio['prompt']:.2f}x, total {ratio['total']:.2f}x.")
    lines.append("Other runs seen on the machine: " + (", ".join(result["other_runs_seen"]) or "none") + ".")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
