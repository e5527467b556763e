"""Does what the mid-trained model knows about the next item reach the re-rank prompt? (issue 16)

For the first `--rows` test lists that hold their target, the model scores every candidate as the first item of its
answer: the summed log-probability of the candidate's SID tokens after a prompt layout, teacher-forced (no
sampling, no training). R@1 of the best-scored candidate is reported per layout, beside the pre-rank order's own R@1
on the same lists (its first candidate) and a random pick's (1 / list length):

| layout | the text before the first answer SID |
|---|---|
| next_item | mid-training's next-item prompt (`Purchase history:` + the history SIDs), what the pre-ranker scores |
| candidates_next_item | the candidate lines (SID + title), then the next-item prompt; no chat template, no JSON |
| candidates_next_item_json | the same, then the answer's JSON opening (`{"explanation": "", "recommendations": ["`) |
| chat_candidates_next_item | the same text as the user turn of the chat template, then the answer's JSON opening |
| rerank_prompt | the re-rank prompt (rec.rerank.PromptBuilder, history as numbered SID + title lines) + JSON opening |
| rerank_prompt_midhist | the re-rank prompt with `history_format: midtrain` + the answer's JSON opening |

Scores are full-vocabulary log-probabilities (a model mid-trained with `sid_softmax: level` was trained on SID codes
against their level's codes only; the ranking between candidates at one level is the same either way, the sum over
levels is not exactly the pre-ranker's). Writes bench/results/prompt_transfer_<run dir name>.{md,json}.

    python bench/prompt_transfer.py --run-dir runs/tiny_full --model models/midtrain --rows 300   # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common import REPO_ROOT  # noqa: E402
from rec.io import RunDir  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
LAYOUTS = ("next_item", "candidates_next_item", "candidates_next_item_json", "chat_candidates_next_item", "rerank_prompt",
           "rerank_prompt_midhist")


def answer_opening() -> str:
    """The answer text before its first SID (rec.rerank.format_answer with an empty explanation)."""
    from rec.rerank import format_answer

    marker = "\x00"
    text = format_answer("", [marker])
    return text[: text.index(json.dumps(marker))] + '"'


def layout_prefixes(row: dict, builders: dict, tokenizer, history_items: int) -> dict[str, list[int]]:
    """Token ids of the text before the first answer SID, per layout."""
    from rec.midtrain_data import NEXT_ITEM_PREFIX
    from rec.rerank import SYSTEM_PROMPT

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    b = builders["rerank"]
    next_item = NEXT_ITEM_PREFIX + "".join(b.sid_of[h] for h in row["history"][-history_items:])
    listed = "Candidates:\n" + "\n".join(f"{n}. {b.sid_of[c]} {b.title_of.get(c, '')[:80]}"
                                         for n, c in enumerate(row["candidates"], 1))
    chat = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": listed + "\n\n" + next_item}],
                                         tokenize=False, add_generation_prompt=True)
    opening = encode(answer_opening())
    return {
        "next_item": encode(next_item),
        "candidates_next_item": encode(listed + "\n\n" + next_item),
        "candidates_next_item_json": encode(listed + "\n\n" + next_item) + opening,
        "chat_candidates_next_item": encode(chat) + opening,
        "rerank_prompt": builders["rerank"].prompt(row["history"], row["candidates"])[1] + opening,
        "rerank_prompt_midhist": builders["midtrain"].prompt(row["history"], row["candidates"])[1] + opening,
    }


def candidate_scores(model, tokenizer, prefix: list[int], candidates: list[list[int]]) -> np.ndarray:
    """Summed log-probabilities of each candidate's tokens right after `prefix`, one batch."""
    import torch

    seqs = [prefix + c for c in candidates]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for n, seq in enumerate(seqs):
        ids[n, : len(seq)], mask[n, : len(seq)] = torch.tensor(seq), 1
    with torch.no_grad():
        logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    start = len(prefix) - 1
    return np.array([sum(logprobs[n, start + j, tok].item() for j, tok in enumerate(c))
                     for n, c in enumerate(candidates)])


def measure(run_dir: RunDir, model_path: str, rows: int, history_items: int, threads: int) -> dict:
    import torch

    from rec.model import load_student
    from rec.rerank import PromptBuilder, RerankPromptSection

    torch.set_num_threads(threads)
    tokenizer, model = load_student(model_path, dtype=torch.float32)
    model.eval()
    section = RerankPromptSection(history_token_budget=400, max_title_chars=80)
    builders = {fmt: PromptBuilder.for_run(tokenizer, run_dir, section.model_copy(update={"history_format": fmt}))
                for fmt in ("rerank", "midtrain")}
    table = run_dir.read_parquet("candidates", "test.parquet").select(["history", "target", "candidates"])
    chosen = [r for r in table.to_pylist() if r["target"] in r["candidates"]][:rows]
    if not chosen:
        raise ValueError(f"{run_dir.path('candidates', 'test.parquet')}: no list holds its target")
    hits = {layout: [] for layout in LAYOUTS}
    started = time.perf_counter()
    for n, row in enumerate(chosen, 1):
        sids = [tokenizer(builders["rerank"].sid_of[c], add_special_tokens=False)["input_ids"]
                for c in row["candidates"]]
        target = row["candidates"].index(row["target"])
        for layout, prefix in layout_prefixes(row, builders, tokenizer, history_items).items():
            hits[layout].append(int(np.argmax(candidate_scores(model, tokenizer, prefix, sids)) == target))
        if n % 50 == 0:
            print(f"{n}/{len(chosen)} lists, {time.perf_counter() - started:.0f} s", flush=True)
    return {
        "run_dir": run_dir.root, "model": model_path, "rows": len(chosen), "history_items": history_items,
        "prerank_recall@1": float(np.mean([r["candidates"][0] == r["target"] for r in chosen])),
        "random_recall@1": float(np.mean([1 / len(r["candidates"]) for r in chosen])),
        "recall@1": {layout: float(np.mean(v)) for layout, v in hits.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(results: dict) -> str:
    lines = [f"# First-item choice of {results['model']} by prompt layout ({results['rows']} test lists that hold "
             "their target)", "", "| layout | R@1 |", "|---|---:|",
             f"| pre-rank order (its first candidate) | {results['prerank_recall@1']:.4f} |",
             f"| random pick | {results['random_recall@1']:.4f} |"]
    lines += [f"| {layout} | {value:.4f} |" for layout, value in results["recall@1"].items()]
    lines += ["", "Teacher-forced, no training: the candidate whose SID the model finds most likely right after each "
                  "layout's text (bench/prompt_transfer.py lists the layouts). History: the last "
                  f"{results['history_items']} items in the next-item layouts, the prompt's own budget in the re-rank "
                  f"ones. {results['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/tiny_full")
    parser.add_argument("--model", default="models/midtrain", help="a model folder (relative: under the run dir)")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--history-items", type=int, default=60, help="history items in the next-item layouts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results stem (default bench/results/prompt_transfer_<run dir>)")
    args = parser.parse_args(argv)
    run_dir = RunDir.open(args.run_dir)
    model = args.model if args.model.startswith("/") else run_dir.local_path(*args.model.split("/"))
    results = measure(run_dir, model, args.rows, args.history_items, args.threads)
    stem = Path(args.out) if args.out else RESULTS / f"prompt_transfer_{Path(args.run_dir).name}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
