"""Benchmark: the prerank stage over the whole test split with each beam-search back-end, same model, same rows.

For each `--backends` entry the real stage (`pipelines.prerank`, the `tiny_full` preset: 2 actors x 1 core, beam 20,
top 10, full catalogue) runs into a scratch run directory whose inputs (data, sid, models/midtrain) are links to
`--run-dir`, on the test split only (`max_users.train=0 max_users.valid=0`, every test user). Reported per back-end:
wall seconds of the stage (Ray start-up and actor start included), users per second, and the metrics it wrote
(`prerank/metrics.json`); then the largest metric difference between back-ends (the aim: the same metrics to 1e-4),
the fraction of test rows whose top-10 is identical, and the speed-up over vLLM. Writes `bench/results/prerank_backends.json` and prints a Markdown table.

    .venv/bin/python bench/prerank_backends.py --run-dir runs/tiny_full [--backends torch vllm] [--test-users N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10", "target_in_candidates")


def run_once(source: Path, backend: str, test_users: int | None, preset: str) -> dict:
    (REPO_ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gr2-bench-prerank-", dir=REPO_ROOT / "runs") as tmp:
        run_dir = Path(tmp) / "run"
        (run_dir / "models").mkdir(parents=True)
        for part in ("data", "sid"):
            os.symlink((source / part).resolve(), run_dir / part)
        os.symlink((source / "models" / "midtrain").resolve(), run_dir / "models" / "midtrain")
        command = [sys.executable, "-m", "pipelines.prerank", "--config",
                   str(REPO_ROOT / "pipelines" / "configs" / preset / "prerank.yaml"), f"run_dir={run_dir}",
                   f"backend={backend}", "max_users.train=0", "max_users.valid=0",
                   f"max_users.test={test_users if test_users is not None else 'null'}"]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"prerank with backend={backend} failed:\n{done.stderr[-3000:]}")
        metrics = json.loads((run_dir / "prerank" / "metrics.json").read_text())
        lists = pq.read_table(run_dir / "candidates" / "test.parquet", columns=["candidates", "scores"]).to_pydict()
    test = metrics.get("test", metrics)
    users = test.get("users") or metrics.get("users")
    return {"backend": backend, "seconds": round(seconds, 1), "users": users,
            "users_per_s": round(users / seconds, 1) if users else None,
            "metrics": {k: test[k] for k in METRICS if k in test}, "_lists": lists}


def compare_lists(a: dict, b: dict) -> dict:
    """Rows whose top-10 is the same items in the same order, and the largest score difference where it is."""
    same, diff = 0, 0.0
    for items_a, items_b, scores_a, scores_b in zip(a["candidates"], b["candidates"], a["scores"], b["scores"]):
        if items_a == items_b:
            same += 1
            diff = max(diff, max((abs(x - y) for x, y in zip(scores_a, scores_b)), default=0.0))
    return {"rows": len(a["candidates"]), "same_top10_fraction": same / max(len(a["candidates"]), 1),
            "max_score_diff_where_same": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/tiny_full", help="a run dir with data, sid and models/midtrain")
    parser.add_argument("--backends", nargs="+", default=["torch", "vllm"], choices=["torch", "vllm", "hf"])
    parser.add_argument("--test-users", type=int, default=None, help="first N test users (default: all)")
    parser.add_argument("--preset", default="tiny_full")
    parser.add_argument("--note", default="", help="what else was running, which model (written to the results)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "prerank_backends.json"))
    args = parser.parse_args()
    source = Path(args.run_dir)
    rows = [run_once(source, backend, args.test_users, args.preset) for backend in args.backends]
    lists = {r["backend"]: r.pop("_lists") for r in rows}
    first = rows[0]["metrics"]
    diff = max((abs(r["metrics"][k] - first[k]) for r in rows[1:] for k in first), default=0.0)
    speed = {r["backend"]: r["seconds"] for r in rows}
    result = {"run_dir": str(source), "preset": args.preset, "note": args.note, "rows": rows,
              "max_metric_diff": diff, "same_metrics_1e-4": diff <= 1e-4}
    result["candidates_vs_" + rows[0]["backend"]] = {r["backend"]: compare_lists(lists[rows[0]["backend"]],
                                                                              lists[r["backend"]]) for r in rows[1:]}
    if "torch" in speed and "vllm" in speed:
        result["speedup_torch_vs_vllm"] = round(speed["vllm"] / speed["torch"], 2)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| back-end | users | seconds | users/s | " + " | ".join(first) + " |")
    print("|---|---|---|---|" + "---|" * len(first))
    for r in rows:
        print(f"| {r['backend']} | {r['users']} | {r['seconds']} | {r['users_per_s']} | "
              + " | ".join(f"{r['metrics'][k]:.4f}" for k in first) + " |")
    print(json.dumps(result["candidates_vs_" + rows[0]["backend"]]))
    print(f"max metric difference {diff:.2e}; " + (f"torch vs vLLM {result['speedup_torch_vs_vllm']}x"
                                                     if "speedup_torch_vs_vllm" in result else ""))


if __name__ == "__main__":
    main()
