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
    parser.add_argument("--hf-rows", type=int, default=16, help="rows for the HF loop (the first of those rows)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "traces_throughput.json"))
    args = parser.parse_args()
    setup_env()
    setup_logging()
    source = Path(args.run_dir).resolve()
    config = Path(args.config)
    if not (source / "candidates" / "train.parquet").exists():
        raise SystemExit(f"{source} has no candidates/train.parquet: run `make demo` first")
    cfg = load_config(TracesConfig, config, [f"run_dir={source}"])
    n = cfg.samples_per_round
    common = ["mode=reject", f"max_rows={args.rows}"]
    with tempfile.TemporaryDirectory(prefix="gr2-bench-traces-", dir=REPO_ROOT / "runs") as tmp:
        root = Path(tmp)
        nway = pipeline(config, scratch_run_dir(source, root, "nway"), common)
        naive = pipeline(config, scratch_run_dir(source, root, "naive"), [*common, "samples_per_round=1"])
        hf = hf_loop(config, scratch_run_dir(source, root, "hf"), ["mode=reject"], args.hf_rows,
                     cores=len(os.sched_getaffinity(0)))
        shutil.rmtree(root, ignore_errors=True)
    cost_nway, cost_naive = per_accepted(nway), per_accepted(naive)
    result = {
        "run_dir": str(source), "config": str(config), "rows": args.rows, "hf_rows": args.hf_rows,
        "samples_per_round": n, "max_attempts": cfg.max_attempts, "actors": cfg.actors,
        "pipeline_nway": nway, "pipeline_naive": naive, "hf_loop": hf,
        "speedup_rows_per_second": nway["rows_per_second"] / hf["rows_per_second"],
        "tokens_per_accepted": {"nway": cost_nway, "naive": cost_naive},
        "ratio_nway_vs_naive": {k: cost_nway[k] / cost_naive[k] for k in cost_nway},
    }
    lines = [
        f"Reject sampling, tiny preset teacher, {args.rows} rows per pipeline run, {args.hf_rows} rows for the HF loop "
        f"(n = {n} per round, max_attempts = {cfg.max_attempts}).",
        "",
        "| run | rows | rows/s | acceptance | attempts mean | generated tok / accepted | prompt tok / accepted "
        "| total tok / accepted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, stats, cost in (("Ray Data + vLLM, n-way", nway, cost_nway),
                              ("Ray Data + vLLM, naive (n = 1)", naive, cost_naive)):
        lines.append(f"| {name} | {stats['rows']} | {stats['rows_per_second']:.2f} | {stats['acceptance_rate']:.3f} | "
                     f"{stats['attempts_mean']:.2f} | {cost['generated']:.0f} | {cost['prompt']:.0f} | "
                     f"{cost['total']:.0f} |")
    lines.append(f"| HF generate loop, n-way | {hf['rows']} | {hf['rows_per_second']:.2f} | "
                 f"{hf['acceptance_rate']:.3f} | | {hf['generated_tokens_per_accepted']:.0f} | | |")
    ratio = result["ratio_nway_vs_naive"]
    lines += [
        "",
        f"Pipeline vs HF loop: {result['speedup_rows_per_second']:.1f}x rows/s (pipeline time includes Ray and engine "
        "start-up).",
        f"n-way vs naive, per accepted trace: generated tokens {ratio['generated']:.2f}x, prompt tokens "
        f"{ratio['prompt']:.2f}x, total {ratio['total']:.2f}x.",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
