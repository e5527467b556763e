"""Benchmark: midtrain tokens/s with 1 vs 2 Ray Train workers (DeepSpeed ZeRO-2 over gloo), tiny preset; or the
`vocab` vs `level` SID softmax (`--sid-softmax vocab level`) on one preset; or any config variants
(`--variant "data.next_item_markers=true" --variant "data.next_item_markers=false"`, each a set of overrides).

Runs the real `pipelines.midtrain` stage for a short schedule in fresh copies of a run directory that already holds
`data/` and `sid/` (e.g. after `make demo`), once per worker count, and reads `tokens_per_s` (measured after the
first logging window) from each run's report. Prints a Markdown table and writes `bench/results/midtrain_throughput.json`.

    .venv/bin/python bench/midtrain_throughput.py [--run-dir runs/tiny] [--steps 40] [--workers 1 2]
    .venv/bin/python bench/midtrain_throughput.py --run-dir runs/tiny_full \
        --config pipelines/configs/tiny_full/midtrain.yaml --workers 2 --steps 60 --sid-softmax vocab level \
        --out bench/results/midtrain_sid_softmax.json
    .venv/bin/python bench/midtrain_throughput.py --run-dir runs/tiny_full \
        --config pipelines/configs/tiny_full/midtrain.yaml --workers 2 --steps 60 \
        --variant "data.next_item_markers=true" --variant "data.next_item_markers=false" \
        --out bench/results/midtrain_next_item_markers.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

from machine import machine, other_heavy_runs  # noqa: E402


def run_once(source: Path, workers: int, steps: int, config: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="gr2-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        for part in ("data", "sid"):
            shutil.copytree(source / part, run_dir / part)
        command = [
            sys.executable, "-m", "pipelines.midtrain", "--config", config,
            f"run_dir={run_dir}", f"train.max_steps={steps}", f"train.num_workers={workers}",
            "train.cpus_per_worker=1", "train.log_every_steps=10", "train.checkpoint_every_steps=100000",
        ] + overrides
        subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        return json.loads((run_dir / "models" / "midtrain" / "midtrain_report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/tiny", help="run directory with data/ and sid/")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--config", default="pipelines/configs/tiny/midtrain.yaml")
    parser.add_argument("--sid-softmax", nargs="+", default=[None], choices=["vocab", "level"],
                        help="compare SID softmaxes (default: the config's)")
    parser.add_argument("--variant", action="append", default=None,
                        help="space-separated config overrides of one variant (repeat to compare; overrides "
                             "--sid-softmax)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "midtrain_throughput.json"))
    args = parser.parse_args()
    source = Path(args.run_dir).resolve()
    if not (source / "sid" / "sid_map.parquet").exists():
        raise SystemExit(f"{source} has no sid/sid_map.parquet: run `make demo` (or prepare + sid) first")
    variants = ([variant.split() for variant in args.variant] if args.variant else
                [[f"sid_softmax={name}"] if name else [] for name in args.sid_softmax])
    others, rows = other_heavy_runs(), []
    for overrides in variants:
        for workers in args.workers:
            report = run_once(source, workers, args.steps, args.config, overrides)
            next_item = report["mixture"].get("next_item", {})
            rows.append({"workers": workers, "overrides": " ".join(overrides),
                         "sid_softmax": report["config"].get("sid_softmax", "vocab"),
                         "next_item_markers": report["config"]["data"].get("next_item_markers", True),
                         "next_item_loss_tokens": next_item.get("loss_tokens"),
                         "steps": report["steps"], "tokens_per_s": report["tokens_per_s"],
                         "seconds_train": report.get("seconds_train"), "final_loss": report["final_loss"]})
            print(f"{workers} worker(s), {rows[-1]['overrides'] or 'as configured'}: "
                  f"{report['tokens_per_s']:.0f} tokens/s", flush=True)
    base = rows[0]["tokens_per_s"]
    print("\n| workers | variant | sid_softmax | tokens/s | speed-up | train seconds |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['overrides'] or '-'} | {row['sid_softmax']} | {row['tokens_per_s']:.0f} "
              f"| {row['tokens_per_s'] / base:.2f}x | {row['seconds_train']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "steps": args.steps, "machine": machine(),
                                          "other_heavy_runs": others, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
