"""What batching can buy the Ranker on this machine: the beam-search engine alone, histories per call 1 .. 64.

Runs `rec.engines.sid_ranker.SidRanker` (the serving Ranker's and the prerank stage's code) in-process on one core,
with each back-end in `--backends` (torch: the batched search on the model, 1 thread; vllm: one engine bound to
the core), over the first test users' histories of a run dir, and prints milliseconds per call and per history
for each batch size. The per-history cost at batch 1 over the cost at a large batch is the most that Serve's request
batching can gain for the Ranker (`bench/serve_load.py` measures the whole app). Writes
bench/results/ranker_batching.json.

    python bench/ranker_batching.py --run-dir runs/tiny [--backends torch vllm]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common import REPO_ROOT, EngineSection, setup_env, setup_logging, start_sid_ranker  # noqa: E402
from rec.io import RunDir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["torch", "vllm"], choices=["torch", "vllm", "hf"])
    args = parser.parse_args()
    setup_env()
    setup_logging()
    run_dir = RunDir.open(args.run_dir)
    codebook = int(run_dir.read_json("sid", "report.json")["codebook_size"])
    engine = EngineSection(max_model_len=1024, kv_cache_memory_bytes=256 * 2**20)
    histories = [h for h in run_dir.read_parquet("data", "test.parquet").column("history").to_pylist() if h]
    results = {}
    for backend in args.backends:  # vLLM last: it binds this process to a core
        ranker, _lock = start_sid_ranker(run_dir, run_dir.local_path("models", "midtrain"), codebook, engine, backend,
                                         num_beams=20, top_n=10, cpus=1, gpus=0)
        ranker.rank(histories[:2])  # warm-up
        rows = []
        for batch in args.batches:
            seconds = []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                ranker.rank(histories[repeat * batch:(repeat + 1) * batch])
                seconds.append(time.perf_counter() - start)
            best = min(seconds)
            rows.append({"batch": batch, "ms_per_call": round(1000 * best, 1),
                         "ms_per_history": round(1000 * best / batch, 2)})
            print(f"{backend} batch {batch:3}: {1000 * best:8.1f} ms per call, {1000 * best / batch:6.2f} ms per "
                  "history", flush=True)
        gain = rows[0]["ms_per_history"] / min(r["ms_per_history"] for r in rows)
        print(f"{backend}: most batching can gain for the Ranker here: {gain:.2f}x")
        results[backend] = {"rows": rows, "max_gain": round(gain, 2)}
        del ranker
    out = REPO_ROOT / "bench" / "results" / "ranker_batching.json"
    out.write_text(json.dumps({"run_dir": args.run_dir, "beam": 20, "top_n": 10, "cores": 1, "backends": results,
                               "command": "python " + " ".join(sys.argv)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
