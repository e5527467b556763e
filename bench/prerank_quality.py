"""Benchmark: the pre-ranker's quality on a preset (all test users, full catalogue) against the TIGER aim, and what
it took to train it.

Runs the preset's real `pipelines.midtrain` stage (nothing to do when the run dir already holds the finished model:
its report is read back) and `pipelines.prerank` on the test rows only (`max_users.train=0 max_users.valid=0`;
`--all-splits` pre-ranks the re-ranker's train/valid lists too), then writes the test metrics, the mid-training
run's size and wall time, the machine and whatever else ran alongside to `bench/results/prerank_<preset>.json`.

    .venv/bin/python bench/prerank_quality.py --preset tiny_full --run-dir runs/tiny_full

The run dir needs `data/` and `sid/` (`make demo PRESET=tiny_full` up to sid, or the two stages).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

from machine import machine, other_heavy_runs  # noqa: E402

TIGER = {"recall@5": 0.0454, "ndcg@5": 0.0321}
"""TIGER on Amazon Beauty (Rajput et al. 2023, table 2): the bar issue 16 sets for the pre-ranker."""


def stage(name: str, config: Path, run_dir: Path, *overrides: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"pipelines.{name}", "--config", str(config), f"run_dir={run_dir}",
                    *overrides], cwd=REPO_ROOT, check=True)
    return round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny_full")
    parser.add_argument("--run-dir", default=None, help="default runs/<preset>")
    parser.add_argument("--all-splits", action="store_true", help="pre-rank the train and valid lists too")
    parser.add_argument("--midtrain-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the preset's midtrain config the run dir was trained with (e.g. "
                             "train.epochs=5.5): without them a run dir trained for fewer steps would be resumed")
    parser.add_argument("--prerank-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the preset's prerank config (e.g. num_beams=40)")
    parser.add_argument("--note", default=None, help="context for a reader of the results file")
    parser.add_argument("--stretch-recall-at-5", type=float, default=0.05)
    parser.add_argument("--out", default=None, help="default bench/results/prerank_<preset>.json")
    args = parser.parse_args()
    configs = REPO_ROOT / "pipelines" / "configs" / args.preset
    run_dir = Path(args.run_dir or f"runs/{args.preset}").resolve()
    if not (run_dir / "sid" / "sid_map.parquet").exists():
        raise SystemExit(f"{run_dir} has no sid/sid_map.parquet: run the prepare and sid stages of {args.preset} first")
    others = other_heavy_runs()
    midtrain_seconds = stage("midtrain", configs / "midtrain.yaml", run_dir, *args.midtrain_set)
    splits = [] if args.all_splits else ["max_users.train=0", "max_users.valid=0"]
    prerank_seconds = stage("prerank", configs / "prerank.yaml", run_dir, *splits, *args.prerank_set)
    report = json.loads((run_dir / "models" / "midtrain" / "midtrain_report.json").read_text())
    metrics = json.loads((run_dir / "prerank" / "metrics.json").read_text())
    config = report["config"]
    test = {key: metrics[key] for key in ("users", "recall@5", "recall@10", "ndcg@5", "ndcg@10")}
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "other_heavy_runs_at_start": others,
        "midtrain": {
            "config": str((configs / "midtrain.yaml").relative_to(REPO_ROOT)),
            "sid_softmax": config.get("sid_softmax", "vocab"),
            "next_item_markers": config["data"].get("next_item_markers", True),
            "epochs_in_config": yaml.safe_load((configs / "midtrain.yaml").read_text())["train"]["epochs"],
            "overrides": args.midtrain_set,
            "steps": report["steps"],
            "tokens": report["tokens"],
            "tokens_per_s": report["tokens_per_s"],
            "final_loss": report["final_loss"],
            "seconds_train": report["seconds_train"],
            "seconds_this_call": midtrain_seconds,
            # the held-out next-item loss by step (valid targets; absent for models trained before it was logged)
            "held_out": report.get("held_out"),
        },
        "prerank_command": "python -m pipelines.prerank --config "
                           f"{(configs / 'prerank.yaml').relative_to(REPO_ROOT)} {' '.join([*splits, *args.prerank_set])}".strip(),
        "prerank_seconds": prerank_seconds,
        "test": test,
        "aim": {**TIGER, "stretch_recall@5": args.stretch_recall_at_5, "midtrain_minutes_at_most": 60},
        "met": (test["recall@5"] >= TIGER["recall@5"] and test["ndcg@5"] >= TIGER["ndcg@5"]
                and report["seconds_train"] <= 3600),
        "stretch_met": test["recall@5"] >= args.stretch_recall_at_5,
        **({"note": args.note} if args.note else {}),
    }
    out = Path(args.out or REPO_ROOT / "bench" / "results" / f"prerank_{args.preset}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"test": test, "met": result["met"], "seconds_train": report["seconds_train"]}, indent=2))


if __name__ == "__main__":
    main()
