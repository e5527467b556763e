"""RL ablations side by side: identity-permutation rate, reward and validation N@5 over training, per run.

Reads `<run_dir>/models/<output>/train_log.jsonl` (and rl_report.json) of RL runs trained with the same length,
e.g. the conditional reward (`rl`) against the unconditional one (`rl_uncond`), and prints a table: identity rate
over the first and last quarter of the steps, mean reward, validation R@1 / N@5 at the start and the end. Writes
bench/results/rl_ablation_<name>.{json,md,png}.

    python -m pipelines.rl --config pipelines/configs/tiny_full/rl.yaml                      # -> models/rl
    python -m pipelines.rl --config pipelines/configs/tiny_full/rl.yaml rl.reward=unconditional output=rl_uncond
    python bench/rl_ablation.py --run-dir runs/tiny_full --runs rl rl_uncond
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common import REPO_ROOT  # noqa: E402
from pipelines.train_utils import read_train_log  # noqa: E402
from rec.io import RunDir  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"


def summary(history: list[dict], report: dict) -> dict:
    quarter = max(1, len(history) // 4)
    evals = [h for h in history if "val_ndcg@5" in h]
    return {
        "steps": len(history), "init_model": Path(report["init_model"]).name, "reward": report["reward"],
        "identity_first_quarter": float(np.mean([h["identity_rate"] for h in history[:quarter]])),
        "identity_last_quarter": float(np.mean([h["identity_rate"] for h in history[-quarter:]])),
        "reward_first_quarter": float(np.mean([h["reward_mean"] for h in history[:quarter]])),
        "reward_last_quarter": float(np.mean([h["reward_mean"] for h in history[-quarter:]])),
        "kept_group_fraction": float(np.mean([h["kept_group_fraction"] for h in history])),
        "val_first": {k: evals[0][k] for k in ("val_recall@1", "val_ndcg@5")} if evals else None,
        "val_last": {k: evals[-1][k] for k in ("val_recall@1", "val_ndcg@5")} if evals else None,
        "prerank_val": report.get("prerank_val"), "mean_step_s": report.get("mean_step_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/tiny_full")
    parser.add_argument("--runs", nargs="+", default=["rl", "rl_uncond"], help="model folders under models/")
    parser.add_argument("--name", default=None, help="results file suffix (default: the run dir's name)")
    args = parser.parse_args()
    run_dir = RunDir.open(args.run_dir)
    histories, rows = {}, {}
    for name in args.runs:
        histories[name] = read_train_log(run_dir, "models", name)
        rows[name] = summary(histories[name], run_dir.read_json("models", name, "rl_report.json"))
    lengths = {len(h) for h in histories.values()}
    lines = [f"# RL ablation on {args.run_dir}" + ("" if len(lengths) == 1 else " (runs of different lengths!)"), "",
             "| run | from | reward | steps | identity first 1/4 | identity last 1/4 | reward first 1/4 | "
             "reward last 1/4 | kept groups | val R@1 start -> end | val N@5 start -> end | pre-rank val N@5 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for name, r in rows.items():
        first, last, pre = r["val_first"] or {}, r["val_last"] or {}, r["prerank_val"] or {}
        lines.append(
            f"| {name} | {r['init_model']} | {r['reward']} | {r['steps']} | {r['identity_first_quarter']:.3f} | "
            f"{r['identity_last_quarter']:.3f} | {r['reward_first_quarter']:.3f} | {r['reward_last_quarter']:.3f} | "
            f"{r['kept_group_fraction']:.2f} | {first.get('val_recall@1', float('nan')):.3f} -> "
            f"{last.get('val_recall@1', float('nan')):.3f} | {first.get('val_ndcg@5', float('nan')):.3f} -> "
            f"{last.get('val_ndcg@5', float('nan')):.3f} | {pre.get('val_ndcg@5', float('nan')):.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    stem = RESULTS / f"rl_ablation_{args.name or Path(args.run_dir).name}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, history in histories.items():
        steps = [h["step"] for h in history]
        window = max(1, len(history) // 10)
        smooth = np.convolve([h["identity_rate"] for h in history], np.ones(window) / window, mode="same")
        axes[0].plot(steps, smooth, label=name)
        axes[1].plot(steps, np.convolve([h["reward_mean"] for h in history], np.ones(window) / window, mode="same"),
                     label=name)
        evals = [h for h in history if "val_ndcg@5" in h]
        axes[2].plot([h["step"] for h in evals], [h["val_ndcg@5"] for h in evals], marker="o", label=name)
    for ax, title in zip(axes, ("identity-permutation rate (smoothed)", "reward mean (smoothed)", "validation N@5")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
