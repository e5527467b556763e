"""Re-ranker levers side by side on one finished run, every row measured on the same test lists (issue 16).

Given a run dir whose midtrain, prerank, traces and sft stages are done (`PRESET=tiny_full`), each variant trains what
it needs into a model folder of its own (the stages skip work already finished) and is evaluated by
`pipelines.evaluate` on the preset's test lists into `eval/rows_<variant>.parquet`. A variant whose rows file exists is
skipped, so a killed or extended ablation resumes where it stopped; a row evaluated earlier under the same name (the
preset's own evaluation writes `rows_prerank`, `rows_sft_reject`, `rows_rl`) is reused. Each variant's evaluation is
its own `pipelines.evaluate` run, so `eval/metrics.json` and `eval/table.md` hold the last one's model afterwards
(rerun the preset's evaluate config to rewrite them: its finished models are skipped).

Variants (`--source reject`; `--source target` or `--source promoted` name them `sft_<source>...`, `rl_<source>...`;
`--only NAME ...` picks some). `promoted` needs no traces stage: SFT on the pre-rank training lists answered with
the shown order, target first, no explanation (pipelines/sft.py). The results file holds every variant of every
source evaluated in the run dir so far, so runs of different sources and `--only` subsets add up to one table.

| variant | lever |
|---|---|
| prerank | the incoming order |
| midtrain | the mid-trained model, not tuned (chat prompt, JSON answer) |
| midtrain_nextsids | the mid-trained model, not tuned, on the next-item prompt answering with the SIDs alone |
| midtrain_nexttop1 | the same, its answer only the first item (`prompt.answer_top=1`; the rest keep the pre-rank order) |
| sft_reject | SFT, prompts in pre-rank order |
| sft_reject_shuffle | SFT on prompts that list the candidates shuffled (`prompt.shuffle_candidates`) |
| sft_reject_noexp | sft_reject answering without an explanation (`sampling.max_explanation_tokens=0`) |
| sft_reject_sc4 | sft_reject with permutation self-consistency over 4 orders (Borda) |
| sft_reject_midhist | SFT with the history written as mid-training saw it (`prompt.history_format=midtrain`) |
| sft_reject_nextitem | SFT on plain-text prompts that end in mid-training's next-item sequence (`prompt.layout=next_item`) |
| sft_reject_nextsids | sft_reject_nextitem answering with the ranked SIDs alone (`prompt.answer=sids`: no JSON opening before the first SID) |
| rl | RL from sft_reject, the preset's steps (200) |
| rl_shuffle | RL from sft_reject_shuffle (its prompt, shuffled, travels with the model into the rollouts) |
| rl_zero | RL from midtrain (no SFT) |
| rl_zero_nextsids | RL from midtrain on the next-item prompt answering with the SIDs alone (`--zero-lr X`: at learning rate X, named rl_zero_nextsids_lrX) |
| rl_zero_nexttop1 | the same, the answer one SID: the item to put first, the rest in pre-rank order (`prompt.answer_top=1`; `--zero-lr` too) |
| rl_long | RL from sft_reject, `--long-steps` (1,000) steps; its validation curve is in the json (`--long-lr X`: at learning rate X, named rl_long_lrX) |
| rl_noexp | RL from sft_reject without explanations, in training and evaluation |
| rl_sc4 | rl with self-consistency over 4 orders |
| rl_midhist | RL from sft_reject_midhist |
| rl_nextitem | RL from sft_reject_nextitem |
| rl_nextsids | RL from sft_reject_nextsids |

Writes bench/results/rerank_ablation_<run dir name>.{md,json}: per variant N@5, N@10, R@1, identity and invalid
rates, the training seconds of its model (its sft_report / rl_report) and the driver's evaluation seconds (kept in
`<run_dir>/eval/rerank_ablation_seconds.json`), the commands, and RL validation curves.

    python bench/rerank_ablation.py --run-dir runs/tiny_full --dry-run       # the commands it would run
    python bench/rerank_ablation.py --run-dir runs/tiny_full                 # hours on 2 cores (rl_long ~45 min)
    python bench/rerank_ablation.py --run-dir runs/tiny_full --only prerank sft_reject sft_reject_sc4
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common import REPO_ROOT  # noqa: E402
from rec.io import RunDir  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
SECONDS_FILE = ("eval", "rerank_ablation_seconds.json")
SOURCES = ("reject", "target", "promoted")
NO_EXPLANATION = ("sampling.max_explanation_tokens=0",)
# The next_item layout answered by the ranked SIDs alone: the first answer token follows the history directly.
NEXT_SIDS = ("prompt.history_format=midtrain", "prompt.layout=next_item", "prompt.answer=sids")
# ... and the answer names one SID, the first; the other candidates keep the pre-rank order (prompt.answer_top=1).
NEXT_TOP1 = (*NEXT_SIDS, "prompt.answer_top=1")
# (key in the results, table column, decimals)
COLUMNS = (("ndcg@5", "N@5", 4), ("ndcg@10", "N@10", 4), ("recall@1", "R@1", 4), ("identity_rate", "identity", 4),
           ("invalid_rate", "invalid", 4), ("order_tau", "tau", 3), ("first_pick_ndcg@5", "pick N@5", 4),
           ("train_s", "train s", 0), ("eval_s", "eval s", 0))


@dataclass(frozen=True)
class Step:
    """One stage run that a variant needs before its evaluation (`key=value` overrides of the preset's config)."""

    stage: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Variant:
    name: str
    """Its row: `eval/rows_<name>.parquet`."""
    lever: str
    model: str | None
    """The evaluated folder under models/; None is the pre-rank order."""
    steps: tuple[Step, ...] = ()
    evaluate: tuple[str, ...] = ()
    """Overrides of the evaluate config (its sampling)."""
    orders: int = 1
    """Self-consistency orders (1: one answer per list)."""


def variants(source: str = "reject", long_steps: int = 1000, orders: int = 4, long_lr: float | None = None,
             sft_lr: float | None = None, zero_lr: float | None = None) -> list[Variant]:
    """Every variant, in table order; `long_lr` sets the long RL run's learning rate (its name then says so);
    `sft_lr` adds an SIDs-answer SFT variant at that learning rate; `zero_lr` sets the learning rate of RL-zero on
    the SIDs answer (its name then says so)."""
    sft = f"sft_{source}"
    rl = "rl" if source == "reject" else f"rl_{source}"

    def train_sft(output: str | None = None, *overrides: str) -> Step:
        # no output for sft_<source>: `output` is fingerprinted, and the preset's own run left it null
        return Step("sft", (f"source={source}", *overrides, *([f"output={output}"] if output else [])))

    def train_rl(init: str, output: str, *overrides: str) -> Step:
        return Step("rl", (f"init_model=models/{init}", *overrides, f"output={output}"))

    base_sft, base_rl = train_sft(), train_rl(sft, rl)
    taught = ("SFT (promoted: the shown order, target first; no teacher)" if source == "promoted"
              else f"SFT ({source} traces)")
    shuffle_sft = train_sft(f"{sft}_shuffle", "prompt.shuffle_candidates=true")
    midhist_sft = train_sft(f"{sft}_midhist", "prompt.history_format=midtrain")
    long_name = f"{rl}_long" + (f"_lr{long_lr:g}" if long_lr else "")
    nextitem_sft = train_sft(f"{sft}_nextitem", "prompt.history_format=midtrain", "prompt.layout=next_item")
    nextsids_sft = train_sft(f"{sft}_nextsids", *NEXT_SIDS)
    zero_sids = "rl_zero_nextsids" + (f"_lr{zero_lr:g}" if zero_lr else "")
    zero_top1 = "rl_zero_nexttop1" + (f"_lr{zero_lr:g}" if zero_lr else "")
    zero_lr_args = (f"train.lr={zero_lr:g}",) if zero_lr else ()
    return [
        Variant("prerank", "pre-rank order", None),
        Variant("midtrain", "the mid-trained model, not tuned (chat prompt, JSON answer)", "midtrain"),
        Variant("midtrain_nextsids", "the mid-trained model, not tuned: next-item prompt, answer = the SIDs alone",
                "midtrain", (), NEXT_SIDS),
        Variant("midtrain_nexttop1", "the mid-trained model, not tuned: next-item prompt, the answer picks the first "
                "item only (`prompt.answer_top=1`: the rest keep the pre-rank order)", "midtrain", (), NEXT_TOP1),
        Variant(sft, f"{taught}, candidates in pre-rank order", sft, (base_sft,)),
        Variant(f"{sft}_shuffle", f"{taught}, candidates shuffled in every prompt", f"{sft}_shuffle", (shuffle_sft,)),
        Variant(f"{sft}_noexp", f"{taught}, answers without explanation", sft, (base_sft,), NO_EXPLANATION),
        Variant(f"{sft}_sc{orders}", f"{taught}, self-consistency over {orders} orders (Borda)", sft, (base_sft,),
                orders=orders),
        Variant(f"{sft}_midhist", f"{taught}, history as mid-training wrote it", f"{sft}_midhist", (midhist_sft,)),
        Variant(f"{sft}_nextitem", f"{taught}, plain-text prompt ending in mid-training's next-item sequence",
                f"{sft}_nextitem", (nextitem_sft,)),
        Variant(f"{sft}_nextsids", f"{taught}, next-item prompt, answer = the ranked SIDs alone (`prompt.answer=sids`)",
                f"{sft}_nextsids", (nextsids_sft,)),
        *([Variant(f"{sft}_nextsids_lr{sft_lr:g}", f"{taught}, next-item prompt, SIDs answer, SFT lr {sft_lr:g}",
                   f"{sft}_nextsids_lr{sft_lr:g}",
                   (train_sft(f"{sft}_nextsids_lr{sft_lr:g}", *NEXT_SIDS, f"train.lr={sft_lr:g}"),))]
          if sft_lr else []),
        Variant(rl, f"RL from {sft}", rl, (base_sft, base_rl)),
        Variant(f"{rl}_shuffle", f"RL from {sft}_shuffle, shuffled rollouts", f"{rl}_shuffle",
                (shuffle_sft, train_rl(f"{sft}_shuffle", f"{rl}_shuffle"))),
        Variant("rl_zero", "RL from midtrain (RL-zero)", "rl_zero", (train_rl("midtrain", "rl_zero"),)),
        Variant(zero_sids, "RL from midtrain (RL-zero), next-item prompt, SIDs answer"
                + (f", lr {zero_lr:g}" if zero_lr else ""), zero_sids,
                (train_rl("midtrain", zero_sids, *NEXT_SIDS, *zero_lr_args),)),
        Variant(zero_top1, "RL from midtrain (RL-zero), next-item prompt, the answer picks the first item only"
                + (f", lr {zero_lr:g}" if zero_lr else ""), zero_top1,
                (train_rl("midtrain", zero_top1, *NEXT_TOP1, *zero_lr_args),)),
        Variant(long_name, f"RL from {sft}, {long_steps} steps" + (f", lr {long_lr:g}" if long_lr else ""),
                long_name, (base_sft, train_rl(sft, long_name, f"rl.steps={long_steps}",
                                               *([f"train.lr={long_lr:g}"] if long_lr else [])))),
        Variant(f"{rl}_noexp", f"RL from {sft}, no explanation (trained and evaluated)", f"{rl}_noexp",
                (base_sft, train_rl(sft, f"{rl}_noexp", *NO_EXPLANATION)), NO_EXPLANATION),
        Variant(f"{rl}_sc{orders}", f"RL from {sft}, self-consistency over {orders} orders (Borda)", rl,
                (base_sft, base_rl), orders=orders),
        Variant(f"{rl}_midhist", f"RL from {sft}_midhist", f"{rl}_midhist",
                (midhist_sft, train_rl(f"{sft}_midhist", f"{rl}_midhist"))),
        Variant(f"{rl}_nextitem", f"RL from {sft}_nextitem", f"{rl}_nextitem",
                (nextitem_sft, train_rl(f"{sft}_nextitem", f"{rl}_nextitem"))),
        Variant(f"{rl}_nextsids", f"RL from {sft}_nextsids", f"{rl}_nextsids",
                (nextsids_sft, train_rl(f"{sft}_nextsids", f"{rl}_nextsids"))),
    ]


def stage_command(stage: str, preset: str, run_dir: str, overrides: tuple[str, ...] = ()) -> list[str]:
    return ["python", "-m", f"pipelines.{stage}", "--config", f"pipelines/configs/{preset}/{stage}.yaml",
            f"run_dir={run_dir}", *overrides]


def commands(variant: Variant, preset: str, run_dir: str) -> list[list[str]]:
    """The stage runs of one variant, its evaluation last."""
    entry: dict[str, Any] = {"name": variant.name, "path": f"models/{variant.model}" if variant.model else "prerank"}
    if variant.orders > 1:
        entry["self_consistency"] = {"orders": variant.orders, "aggregate": "borda"}
    evaluate = stage_command("evaluate", preset, run_dir, (f"models={json.dumps([entry])}", *variant.evaluate))
    return [stage_command(step.stage, preset, run_dir, step.overrides) for step in variant.steps] + [evaluate]


def evaluated(run_dir: RunDir, variant: Variant) -> bool:
    return run_dir.exists("eval", f"rows_{variant.name}.parquet")


def run_variant(run_dir: RunDir, variant: Variant, preset: str, seconds: dict[str, float]) -> None:
    """Run a variant's commands in order (a failing one raises), timing its evaluation into `seconds`."""
    *train, evaluate = commands(variant, preset, run_dir.root)
    for command in train:
        print("+", shlex.join(command), flush=True)
        subprocess.run([sys.executable, *command[1:]], cwd=REPO_ROOT, check=True)
    print("+", shlex.join(evaluate), flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, *evaluate[1:]], cwd=REPO_ROOT, check=True)
    seconds[variant.name] = round(time.perf_counter() - started, 1)
    run_dir.write_json(seconds, *SECONDS_FILE)


def train_seconds(run_dir: RunDir, model: str | None) -> float | None:
    """The training time its stage reported for a model folder (sft_report.json or rl_report.json)."""
    for report in ("sft_report.json", "rl_report.json"):
        if model and run_dir.exists("models", model, report):
            return run_dir.read_json("models", model, report).get("seconds")
    return None


def val_curve(run_dir: RunDir, model: str | None) -> list[dict] | None:
    """An RL model's validation metrics over training (train_log.jsonl), or None."""
    from pipelines.train_utils import read_train_log

    if not model or not run_dir.exists("models", model, "rl_report.json"):
        return None
    return [{k: h[k] for k in ("step", "val_recall@1", "val_ndcg@5")}
            for h in read_train_log(run_dir, "models", model) if "val_ndcg@5" in h]


def collect(run_dir: RunDir, chosen: list[Variant], preset: str, seconds: dict[str, float],
            pending: list[str] | None = None) -> dict[str, Any]:
    """The results of every evaluated variant of `chosen` (metrics from its rows file); all must cover the same test
    lists. `not_evaluated` lists those of `pending` (default: all of `chosen`) without a rows file."""
    from pipelines.evaluate import model_metrics

    rows, row_ids = {}, {}
    for variant in chosen:
        if not evaluated(run_dir, variant):
            continue
        table = run_dir.read_parquet("eval", f"rows_{variant.name}.parquet")
        row_ids[variant.name] = table.column("row_id").to_pylist()
        metrics = model_metrics(table)
        rows[variant.name] = {
            "lever": variant.lever, "model": variant.model, "orders": variant.orders,
            **{key: metrics[key] for key in ("recall@1", "recall@3", "recall@5", "ndcg@3", "ndcg@5", "ndcg@10", "mrr",
                                             "identity_rate", "invalid_rate", "order_tau", "first_pick_ndcg@5",
                                             "random_order_ndcg@5", "mean_generated_tokens", "rows")},
            "train_s": train_seconds(run_dir, variant.model), "eval_s": seconds.get(variant.name),
            "val_curve": val_curve(run_dir, variant.model),
            "commands": [shlex.join(c) for c in commands(variant, preset, run_dir.root)],
        }
    if len({tuple(ids) for ids in row_ids.values()}) > 1:
        sizes = {name: len(ids) for name, ids in row_ids.items()}
        raise ValueError(f"the variants' rows files hold different test lists ({sizes}); evaluate them with one "
                         "config (remove the odd rows files and rerun)")
    return {"run_dir": run_dir.root, "preset": preset, "rows": next(iter(rows.values()))["rows"] if rows else 0,
            "variants": rows,
            "not_evaluated": [name for name in (pending or [v.name for v in chosen]) if name not in rows]}


def with_earlier_rows(results: dict[str, Any], stem: Path, run_dir: RunDir) -> dict[str, Any]:
    """`results` plus the rows of the results file at `stem` that this invocation's variants do not name (a
    variant named by an option of an earlier run, `--sft-lr`, `--zero-lr`, `--long-lr`), kept while that run dir
    still holds their rows file and they cover the same number of lists."""
    path = stem.with_suffix(".json")
    if not path.exists():
        return results
    earlier = json.loads(path.read_text())
    if earlier.get("run_dir") != results["run_dir"]:
        return results
    kept = {name: row for name, row in earlier.get("variants", {}).items()
            if name not in results["variants"] and run_dir.exists("eval", f"rows_{name}.parquet")
            and row.get("rows") == results["rows"]}
    return {**results, "variants": {**results["variants"], **kept}}


def markdown(results: dict[str, Any]) -> str:
    """The table: one row per evaluated variant, the pre-rank row first when present."""
    lines = [f"# Re-ranker levers on {results['run_dir']} ({results['rows']} test lists that hold their target)", "",
             "| variant | lever | " + " | ".join(column for _, column, _ in COLUMNS) + " |",
             "|---|---|" + "---:|" * len(COLUMNS)]
    for name, row in results["variants"].items():
        cells = ["-" if row.get(key) is None else f"{row[key]:.{decimals}f}" for key, _, decimals in COLUMNS]
        lines.append(f"| {name} | {row['lever']} | " + " | ".join(cells) + " |")
    lines += ["", "Every row re-ranks the same lists (constrained greedy answers, the preset's evaluate config). "
                  "`identity` = valid answers equal to the pre-rank order / rows (of the aggregated ranking under "
                  "self-consistency); `invalid` = answers that fell back to the pre-rank order; `tau` = mean "
                  "Kendall tau of the valid answers against the pre-rank order (1 keeps it, ~0 unrelated); `pick N@5` "
                  "= N@5 of the pre-rank order with only the variant's first item moved to the front (its choice of "
                  "the next item, the rest of the order kept). `train s` = the "
                  "stage's own time for that model (shared by the rows that evaluate it), `eval s` = the evaluation's "
                  "wall time in this driver (`-`: evaluated elsewhere). Commands per row in the json."]
    random = [row["random_order_ndcg@5"] for row in results["variants"].values() if row.get("random_order_ndcg@5")]
    if random:
        lines.append(f"A random order of these lists scores N@5 {random[0]:.4f} in expectation.")
    if results["not_evaluated"]:
        lines.append(f"Not evaluated yet: {', '.join(results['not_evaluated'])}.")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/tiny_full")
    parser.add_argument("--preset", default="tiny_full", help="configs from pipelines/configs/<preset>/")
    parser.add_argument("--source", default="reject", choices=SOURCES, help="what SFT learns from")
    parser.add_argument("--long-steps", type=int, default=1000, help="RL steps of the long run")
    parser.add_argument("--long-lr", type=float, default=None,
                        help="learning rate of the long RL run (default: the preset's; the variant becomes "
                             "rl_<source>_long_lr<value>)")
    parser.add_argument("--sft-lr", type=float, default=None,
                        help="add the variant sft_<source>_nextsids_lr<value>: SIDs-answer SFT at this learning rate")
    parser.add_argument("--zero-lr", type=float, default=None,
                        help="learning rate of rl_zero_nextsids (default: the preset's; the variant becomes "
                             "rl_zero_nextsids_lr<value>)")
    parser.add_argument("--orders", type=int, default=4, help="self-consistency orders (K)")
    parser.add_argument("--only", nargs="+", default=None, metavar="VARIANT", help="these variants only")
    parser.add_argument("--dry-run", action="store_true", help="print the commands; run nothing, write nothing")
    parser.add_argument("--out", default=None, help="results stem (default bench/results/rerank_ablation_<run dir>)")
    args = parser.parse_args(argv)
    every = variants(args.source, args.long_steps, args.orders, args.long_lr, args.sft_lr, args.zero_lr)
    unknown = set(args.only or ()) - {v.name for v in every}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {[v.name for v in every]}")
    chosen = [v for v in every if args.only is None or v.name in args.only]
    run_dir = RunDir.open(args.run_dir)
    seconds = run_dir.read_json(*SECONDS_FILE) if run_dir.exists(*SECONDS_FILE) else {}
    failed = []
    for variant in chosen:
        if evaluated(run_dir, variant):
            print(f"# {variant.name}: done (eval/rows_{variant.name}.parquet exists)")
            continue
        print(f"# {variant.name}: {variant.lever}", flush=True)
        if args.dry_run:
            print("\n".join(shlex.join(c) for c in commands(variant, args.preset, run_dir.root)))
            continue
        try:
            run_variant(run_dir, variant, args.preset, seconds)
        except subprocess.CalledProcessError as err:  # the stage printed why; the other variants still run
            print(f"# {variant.name}: failed ({shlex.join(err.cmd)} exited {err.returncode})", flush=True)
            failed.append(variant.name)
    if args.dry_run:
        return 0
    known = {v.name: v for source in SOURCES
             for v in variants(source, args.long_steps, args.orders, args.long_lr, args.sft_lr, args.zero_lr)}
    results = collect(run_dir, list({**known, **{v.name: v for v in every}}.values()), args.preset, seconds,
                      pending=[v.name for v in chosen])
    stem = Path(args.out) if args.out else RESULTS / f"rerank_ablation_{Path(args.run_dir).name}"
    results = with_earlier_rows(results, stem, run_dir)
    write_results(results, stem)
    print(markdown(results))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
