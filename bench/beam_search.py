"""Benchmark: SID-constrained beam search (beam 20, batch 64) on three back-ends, and HF's trie processor vs per-beam
Python.

- `torch` (`rec.beam_torch.torch_beam_search`): each prompt prefilled once, then one batched forward per SID
  level with the beams as extra tokens of the user's cache row.
- `vllm` (with `--vllm`; `rec.engines.sid_ranker.VllmSidBeamSearch`): one `max_tokens=1` request per beam per level, the
  prompt shared through the prefix cache; one engine on one core, run last in this process (vLLM pins the process
  to a core).
- HF `generate` (`rec.beam.hf_beam_search`, the reference, which prefills every prompt once per beam), twice, with
  only the logits processor changed: `vectorised` (`rec.beam.SidTrieLogitsProcessor`, every beam walked through
  the tensor trie with one gather per level) and `python_prefix_lookup` (transformers' own
  `PrefixConstrainedLogitsProcessor` asking a dict of SID prefix -> allowed tokens once per beam per step, the
  usual way to constrain HF generation to a trie).
Reported: median wall time per batch of each back-end (and time inside the HF processors), the speed-ups, and per
pair of back-ends whether they returned the same top-10 (items tied within 1e-4 may swap) with the largest score
difference. All back-ends run the same batches.

Default set-up: the tiny preset's model dims (hidden 128, 2 layers, tokenizer of 8192 BPE tokens trained on the
bundled Beauty item text) with random weights, all 12,101 Beauty items with random 3 x 256 SIDs + the
disambiguation level (the trie shape of the tiny preset), and real test histories as prompts. `--run-dir` takes the
SIDs, histories and (if present) the mid-trained model of a run directory instead.

    .venv/bin/python bench/beam_search.py [--batches 3] [--batch 64] [--threads 1] [--max-len 256] \
        [--run-dir runs/tiny] [--vllm] [--out bench/results/beam_search.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, PrefixConstrainedLogitsProcessor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rec.beam import SidDecoding, SidTrieLogitsProcessor, hf_beam_search  # noqa: E402
from rec.beam_torch import torch_beam_search  # noqa: E402
from rec.midtrain_data import SidEncoder, next_item_prompt_ids, tokenizer_corpus  # noqa: E402

NUM_BEAMS, BATCH, TOP_N, LEVELS, CODEBOOK = 20, 64, 10, 4, 256


class Timed(LogitsProcessor):
    """Wraps a processor and adds up the seconds spent in it."""

    def __init__(self, inner: LogitsProcessor, clock: list[float]):
        self.inner, self.clock = inner, clock

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.clock[0] += time.perf_counter() - start
        return out


def prefix_table(decoding: SidDecoding) -> dict[tuple[int, ...], list[int]]:
    """Every SID prefix (as generated token ids) -> the token ids allowed next: the Python baseline's lookup table."""
    table: dict[tuple[int, ...], set[int]] = {}
    frontier = [(0, ())]
    for level in range(decoding.levels):
        nxt = []
        for node, tokens in frontier:
            for code, child in enumerate(decoding.trie.children[node].tolist()):
                if child >= 0:
                    token = int(decoding.code_token_ids[level, code])
                    table.setdefault(tokens, set()).add(token)
                    nxt.append((child, (*tokens, token)))
        frontier = nxt
    return {prefix: sorted(tokens) for prefix, tokens in table.items()}


def python_processor(table: dict[tuple[int, ...], list[int]], clock: list[float]):
    def build(decoding, prompt_len, num_beams, excluded=None):
        def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
            return table.get(tuple(sent[prompt_len:].tolist()), [])

        return Timed(PrefixConstrainedLogitsProcessor(allowed, num_beams), clock)

    return build


def vectorised_processor(clock: list[float]):
    def build(decoding, prompt_len, num_beams, excluded=None):
        return Timed(SidTrieLogitsProcessor(decoding, prompt_len, num_beams, excluded), clock)

    return build


def setup(run_dir: str | None, seed: int):
    """(model path, tokenizer, decoding, encoder, histories): a saved random tiny model, or a run dir's."""
    from transformers import AutoTokenizer

    from rec.data import leave_one_out, load_items, load_sequences
    from rec.model import ModelSection, build_tiny_model, configure_special_ids, train_tokenizer
    from rec.sid.quantize import disambiguate

    if run_dir is not None:
        from rec.io import RunDir

        run = RunDir.open(run_dir)
        sid_map = run.read_parquet("sid", "sid_map.parquet").to_pydict()
        item_ids, codes = sid_map["item_id"], np.array(sid_map["codes"])
        codebook = int(run.read_json("sid", "report.json")["codebook_size"])
        histories = run.read_parquet("data", "test.parquet").column("history").to_pylist()
        texts = run.read_parquet("data", "items.parquet").column("text").to_pylist()
        model_dir = run.local_path("models", "midtrain")
    else:
        dataset = REPO / "data" / "amazon_beauty_2014_5core"
        items = load_items(dataset / "items.jsonl")
        item_ids = items.column("item_id").to_pylist()
        texts = items.column("text").to_pylist()
        sequences = load_sequences(dataset / "sequences.jsonl", set(item_ids), set())
        histories = leave_one_out(sequences)["test"].column("history").to_pylist()
        rng = np.random.default_rng(seed)
        codes = disambiguate(rng.integers(0, CODEBOOK, size=(len(item_ids), LEVELS - 1)), CODEBOOK, seed)
        codebook = CODEBOOK
        model_dir = None
    if model_dir is None or not os.path.exists(os.path.join(model_dir, "config.json")):
        tokenizer = train_tokenizer(tokenizer_corpus(texts), 8192, codes.shape[1], codebook)
        model = build_tiny_model(ModelSection(), len(tokenizer), seed=seed)
        configure_special_ids(tokenizer, model)
        model_dir = tempfile.mkdtemp(prefix="gr2-bench-beam-")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    decoding = SidDecoding.from_sid_map(tokenizer, item_ids, codes, codebook)
    encoder = SidEncoder(tokenizer, item_ids, codes, codebook)
    return model_dir, tokenizer, decoding, encoder, histories


def cpu_name() -> str:
    """The CPU model (platform.processor() is empty on most Linux builds)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def same_top_n(expected: list[tuple[int, float]], found: list[tuple[int, float]], tol: float = 1e-4) -> bool:
    """Same items in the same order with scores within `tol`; items whose scores tie within `tol` may swap (also
    across the top-N cut: a random model scores many SIDs nearly alike)."""
    if len(expected) != len(found):
        return False
    for (item, score), (found_item, found_score) in zip(expected, found):
        if abs(score - found_score) >= tol:
            return False
        if item != found_item:
            tied = {i for i, s in expected if abs(s - score) < tol}
            if found_item not in tied and abs(expected[-1][1] - found_score) >= tol:
                return False
    return True


def compare(a: list[list], b: list[list]) -> tuple[bool, float]:
    """(same top-N for every prompt of every batch, max score difference at equal rank)."""
    rows = [(x, y) for batch_a, batch_b in zip(a, b) for x, y in zip(batch_a, batch_b)]
    same = all(same_top_n(x, y) for x, y in rows)
    diffs = [abs(s - t) for x, y in rows for (_, s), (_, t) in zip(x, y)]
    return same, max(diffs, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=3, help="batches of prompts timed per back-end")
    parser.add_argument("--batch", type=int, default=BATCH, help="prompts per batch (smaller: a quick smoke run)")
    parser.add_argument("--run-dir", default=None, help="take SIDs, histories and model from this run directory")
    parser.add_argument("--max-len", type=int, default=256, help="prompt + SID tokens (longer histories are cut)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core box, 2 threads mostly wait on each other)")
    parser.add_argument("--vllm", action="store_true", help="also time the vLLM back-end on the same batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "beam_search.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model_dir, tokenizer, decoding, encoder, histories = setup(args.run_dir, args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    table = prefix_table(decoding)
    rng = np.random.default_rng(args.seed)
    batches = [[next_item_prompt_ids(encoder, histories[i], args.max_len) for i in
                rng.choice(len(histories), args.batch, replace=False)] for _ in range(args.batches)]
    pad_id = tokenizer.pad_token_id
    hf_beam_search(model, decoding, batches[0][:4], NUM_BEAMS, TOP_N, pad_id=pad_id)  # warm-up

    timings: dict[str, dict[str, list[float]]] = {}
    answers: dict[str, list] = {}
    for name, make in (("vectorised", vectorised_processor), ("python_prefix_lookup", None)):
        timings[name] = {"total_s": [], "processor_s": []}
        answers[name] = []
        for prompts in batches:
            clock = [0.0]
            processor_cls = make(clock) if make else python_processor(table, clock)
            start = time.perf_counter()
            answers[name].append(hf_beam_search(model, decoding, prompts, NUM_BEAMS, TOP_N,
                                                pad_id=pad_id, processor_cls=processor_cls))
            timings[name]["total_s"].append(time.perf_counter() - start)
            timings[name]["processor_s"].append(clock[0])
    torch_beam_search(model, decoding, batches[0][:4], NUM_BEAMS, TOP_N, pad_id=pad_id)  # warm-up
    timings["torch"] = {"total_s": []}
    answers["torch"] = []
    for prompts in batches:
        start = time.perf_counter()
        answers["torch"].append(torch_beam_search(model, decoding, prompts, NUM_BEAMS, TOP_N, pad_id=pad_id))
        timings["torch"]["total_s"].append(time.perf_counter() - start)
    if args.vllm:  # last: vLLM's in-process engine pins this process to one core
        from rec.engines.sid_ranker import VllmSidBeamSearch
        from rec.engines.vllm_runtime import start_llm

        llm = start_llm(model_dir, max_model_len=args.max_len, kv_cache_memory_bytes=256 * 2**20, cpu_cores="0",
                        block_size=32)
        search = VllmSidBeamSearch(llm, decoding, NUM_BEAMS, TOP_N)
        search.search(batches[0][:4])  # warm-up
        timings["vllm"] = {"total_s": []}
        answers["vllm"] = []
        for prompts in batches:
            start = time.perf_counter()
            answers["vllm"].append(search.search(prompts))
            timings["vllm"]["total_s"].append(time.perf_counter() - start)

    pairs = {"vectorised_vs_python_prefix_lookup": ("vectorised", "python_prefix_lookup"),
             "torch_vs_hf": ("vectorised", "torch"), "torch_vs_vllm": ("vllm", "torch"),
             "vllm_vs_hf": ("vectorised", "vllm")}
    same, score_diff = {}, {}
    for pair, (a, b) in pairs.items():
        if a in answers and b in answers:
            same[pair], score_diff[pair] = compare(answers[a], answers[b])
    median = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in timings.items()}
    vec, naive = median["vectorised"], median["python_prefix_lookup"]
    result = {
        "setup": {"num_beams": NUM_BEAMS, "batch": args.batch, "top_n": TOP_N, "levels": decoding.levels,
                  "codebook_size": decoding.codebook_size, "items": len(decoding.trie.leaf_item_ids),
                  "vocab": len(tokenizer), "model_dir": model_dir if args.run_dir else "random tiny (preset dims)",
                  "batches": args.batches, "max_len": args.max_len, "torch_threads": torch.get_num_threads(),
                  "cpu": cpu_name(), "cores": os.cpu_count()},
        "median_seconds_per_batch": median,
        "speedup_total": naive["total_s"] / vec["total_s"],
        "speedup_processor": naive["processor_s"] / vec["processor_s"],
        "speedup_torch_vs_hf": vec["total_s"] / median["torch"]["total_s"],
        "same_top10": same,
        "same_top10_all": all(same.values()),
        "max_score_diff": score_diff,
        "raw": timings,
    }
    if args.vllm:
        result["speedup_torch_vs_vllm"] = median["vllm"]["total_s"] / median["torch"]["total_s"]
        result["vllm_same_top10_as_hf"] = same["vllm_vs_hf"]
    print(f"constrained beam search: beam {NUM_BEAMS}, batch {args.batch}, {result['setup']['items']} items, "
          f"{decoding.levels} levels x {decoding.codebook_size} codes (median of {args.batches} batches)")
    print(f"{'back-end':<24}{'total s/batch':>14}{'processor s':>14}")
    for name, m in median.items():
        print(f"{name:<24}{m['total_s']:>14.3f}{m.get('processor_s', float('nan')):>14.3f}")
    print(f"HF, vectorised vs Python processor: whole search {result['speedup_total']:.1f}x, processor alone "
          f"{result['speedup_processor']:.1f}x; torch vs HF {result['speedup_torch_vs_hf']:.1f}x"
          + (f"; torch vs vLLM {result['speedup_torch_vs_vllm']:.1f}x" if args.vllm else ""))
    print("same top-10: " + ", ".join(f"{pair} {ok} (max score diff {score_diff[pair]:.1e})"
                                      for pair, ok in same.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
