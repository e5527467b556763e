"""Load benchmark of the two-stage Serve app: closed-loop clients on 127.0.0.1, latency percentiles and requests/s.

For batching on (the config's max_batch_size) and off (max_batch_size 1 in both model deployments), for ranker-only
(`rerank: false`) and two-stage requests, at each concurrency: `--requests` requests (bounded by `--time-limit`
seconds per cell), every client sending its next request when the last one returned. Histories are the test users'
histories of the run dir. Prints a table and writes bench/results/serve_load.{json,md}.

    python bench/serve_load.py --config serving/configs/tiny.yaml [--run-dir runs/tiny] [--requests 96]

Needs the run dir's models (`make demo` writes runs/tiny). Loopback only: Serve's proxy listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common import REPO_ROOT, setup_env, setup_logging  # noqa: E402
from rec.io import RunDir  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"


def closed_loop(url: str, histories: list[list[int]], rerank: bool, clients: int, requests: int, time_limit: float,
                budget_ms: int | None) -> dict:
    import httpx

    latencies: list[float] = []
    outcomes: Counter = Counter()
    lock = threading.Lock()
    issued = [0]
    stop_at = time.perf_counter() + time_limit

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    if issued[0] >= requests or time.perf_counter() > stop_at:
                        return
                    n = issued[0]
                    issued[0] += 1
                body = {"history": histories[n % len(histories)], "k": 10, "rerank": rerank}
                if budget_ms is not None:
                    body["budget_ms"] = budget_ms
                start = time.perf_counter()
                response = http.post("/v1/recommend", json=body)
                latency = time.perf_counter() - start
                if response.status_code == 200:
                    answer = response.json()
                    outcome = "reranked" if answer["reranked"] else (answer["fallback"] or "ranker_only")
                else:
                    outcome = f"http_{response.status_code}"
                with lock:
                    latencies.append(latency)
                    outcomes[outcome] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "seconds": round(seconds, 2),
            "requests_per_s": round(len(latencies) / seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "outcomes": dict(outcomes)}


def markdown(results: dict) -> str:
    lines = [f"# Serve load: {results['config']} on {results['machine']}", "",
             f"Command: `{results['command']}`", "",
             f"{results['requests']} requests per cell (at most {results['time_limit_s']} s); closed-loop clients on "
             "127.0.0.1 (on the same cores as the app). Budget 60000 ms: every request is served (throughput); "
             f"budget {results['budget_ms']} ms: late re-rankings fall back to the pre-rank list.", "",
             "| batching | mode | budget ms | clients | req/s | p50 ms | p95 ms | p99 ms | outcomes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for cell in results["cells"]:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(cell["outcomes"].items()))
        lines.append(f"| {cell['batching']} | {cell['mode']} | {cell['budget_ms']} | {cell['clients']} | "
                     f"{cell['requests_per_s']} | "
                     f"{cell['p50_ms']} | {cell['p95_ms']} | {cell['p99_ms']} | {outcomes} |")
    lines += ["", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["figures"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="serving/configs/tiny.yaml")
    parser.add_argument("--run-dir", default=None, help="override the config's run_dir")
    parser.add_argument("--requests", type=int, default=96, help="requests per cell")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per cell at most")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--budget-ms", type=int, default=None, help="request budget (default: the config's)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", default=str(RESULTS / "serve_load"))
    args = parser.parse_args()
    setup_env()
    setup_logging()
    from ray import serve

    from serving.__main__ import start
    from serving.app import build_app
    from serving.config import load_serve_config

    overrides = [f"run_dir={args.run_dir}"] if args.run_dir else []
    base = load_serve_config(args.config, overrides)
    budget = args.budget_ms or base.ingress.default_budget_ms
    test = RunDir.open(base.resolved_run_dir()).read_parquet("data", "test.parquet")
    histories = [h for h in test.column("history").to_pylist() if h][:512]
    batched = base.ranker.max_batch_size, base.reranker.max_batch_size
    unlimited = base.ingress.max_budget_ms  # throughput cells: every request is served, none falls back
    cells = []
    url = None

    def measure(batching, sizes, mode, rerank, clients, budget_ms):
        cell = closed_loop(url, histories, rerank, clients, args.requests, args.time_limit, budget_ms)
        cell.update(batching=batching, mode=mode, budget_ms=budget_ms, max_batch_size=list(sizes))
        cells.append(cell)
        print(f"batching {batching:3} {mode:11} budget {budget_ms:5} ms clients {clients:2}: "
              f"{cell['requests_per_s']:6.2f} req/s, p50 {cell['p50_ms']:7.1f} ms, p95 {cell['p95_ms']:7.1f} ms, "
              f"p99 {cell['p99_ms']:7.1f} ms, {cell['outcomes']}", flush=True)

    for batching, sizes in (("on", batched), ("off", (1, 1))):
        batch_overrides = [*overrides, f"ranker.max_batch_size={sizes[0]}", f"reranker.max_batch_size={sizes[1]}"]
        if url is None:
            _, url = start(args.config, batch_overrides, "127.0.0.1", args.port)
        else:
            cfg = load_serve_config(args.config, batch_overrides)
            serve.run(build_app(cfg.model_dump(mode="json")), name="gr2", route_prefix="/")
        for mode, rerank in (("ranker-only", False), ("two-stage", True)):
            closed_loop(url, histories, rerank, 2, 4, 30, unlimited)  # warm-up
            for clients in args.concurrency:
                measure(batching, sizes, mode, rerank, clients, unlimited)
        if batching == "on":  # the latency budget: two-stage requests fall back to the pre-rank list at the budget
            for clients in args.concurrency:
                measure(batching, sizes, "two-stage", True, clients, budget)
    serve.shutdown()

    def cell(batching, mode, clients, budget_ms=unlimited):
        return next(c for c in cells if (c["batching"], c["mode"], c["clients"], c["budget_ms"])
                    == (batching, mode, clients, budget_ms))

    top = max(args.concurrency)
    figures = {}
    for mode in ("ranker-only", "two-stage"):
        figures[f"{mode} req/s batched / unbatched at {top} clients (no budget)"] = round(
            cell("on", mode, top)["requests_per_s"] / cell("off", mode, top)["requests_per_s"], 2)
    for clients in args.concurrency:
        two, one = cell("on", "two-stage", clients, budget), cell("on", "ranker-only", clients)
        figures[f"two-stage p99 / ranker-only p99 at {clients} clients (batched, budget {budget} ms)"] = round(
            two["p99_ms"] / one["p99_ms"], 2)
        figures[f"two-stage p99 / budget at {clients} clients (batched)"] = round(two["p99_ms"] / budget, 3)
    import os
    results = {"config": args.config, "run_dir": base.resolved_run_dir(), "budget_ms": budget,
               "requests": args.requests, "time_limit_s": args.time_limit,
               "machine": f"{os.cpu_count()} CPUs, no GPU" if not _has_gpu() else "GPU",
               "command": "python " + " ".join(sys.argv), "cells": cells, "figures": figures}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
