"""Benchmark: SFT samples/s with 1 vs 2 Ray Train workers (DeepSpeed ZeRO over gloo), and peak memory per worker.

Runs the real `pipelines.sft` stage for a short schedule in scratch run directories whose inputs (data, sid,
models/midtrain, traces) are links to `--run-dir` (e.g. after `make demo`), once per worker count with the same
per-worker batch, and reads `samples_per_s` (measured after start-up) and `peak_memory_mb` (the largest worker's
peak resident set on CPU, CUDA allocation on GPU) from each run. Prints a Markdown table and writes
`bench/results/sft_throughput.json`.

    .venv/bin/python bench/sft_throughput.py [--run-dir runs/tiny] [--steps 12] [--workers 1 2] [--zero-stage 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_once(source: Path, workers: int, steps: int, zero_stage: int, source_traces: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="gr2-bench-sft-", dir=REPO_ROOT / "runs") as tmp:
        run_dir = Path(tmp) / "run"
        (run_dir / "models").mkdir(parents=True)
        for part in ("data", "sid", "traces"):
            os.symlink(source / part, run_dir / part)
        os.symlink(source / "models" / "midtrain", run_dir / "models" / "midtrain")
        command = [
            sys.executable, "-m", "pipelines.sft", "--config", "pipelines/configs/tiny/sft.yaml", f"run_dir={run_dir}",
            f"source={source_traces}", f"train.max_steps={steps}", f"train.num_workers={workers}",
            f"train.zero_stage={zero_stage}", "train.cpus_per_worker=1", "train.log_every_steps=4",
            "train.checkpoint_every_steps=100000", "eval_fraction=0",
        ]
        subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        output = run_dir / "models" / f"sft_{source_traces}"
        report = json.loads((output / "sft_report.json").read_text())
        log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines() if line.strip()]
        report["peak_memory_mb"] = max(r["peak_memory_mb"] for r in log)
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/tiny", help="run directory with data/, sid/, models/midtrain, traces/")
    parser.add_argument("--source", default="reject", help="traces/{source}.parquet")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "sft_throughput.json"))
    args = parser.parse_args()
    source = Path(args.run_dir).resolve()
    if not (source / "traces" / f"{args.source}.parquet").exists():
        raise SystemExit(f"{source} has no traces/{args.source}.parquet: run `make demo` first")
    rows = []
    for workers in args.workers:
        report = run_once(source, workers, args.steps, args.zero_stage, args.source)
        rows.append({"workers": workers, "steps": report["steps"], "samples_per_s": report["samples_per_s"],
                     "tokens_per_s": report["tokens_per_s"], "peak_memory_mb": report["peak_memory_mb"],
                     "final_loss": report["final_loss"]})
        print(f"{workers} worker(s): {report['samples_per_s']:.2f} samples/s, peak {report['peak_memory_mb']:.0f} MB "
              "per worker", flush=True)
    base = rows[0]["samples_per_s"]
    lines = [f"SFT, tiny preset, ZeRO-{args.zero_stage} over gloo, {args.steps} steps, per-worker batch from "
             "pipelines/configs/tiny/sft.yaml.", "",
             "| workers | samples/s | speed-up | tokens/s | peak memory per worker (MB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base:.2f}x | "
              f"{r['tokens_per_s']:.0f} | {r['peak_memory_mb']:.0f} |" for r in rows]
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "zero_stage": args.zero_stage, "runs": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
