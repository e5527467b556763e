"""Load benchmark of the two-stage Serve app: closed-loop clients on 127.0.0.1, latency percentiles and requests/s.

For batching on (the config's max_batch_size) and off (max_batch_size 1 in both model deployments: the Ranker's
`@serve.batch` and the ReRanker engine's max_num_seqs), for ranker-only (`rerank: false`) and two-stage requests, at
each concurrency: `--requests` requests (bounded by `--time-limit` seconds per cell), every client sending its next
request when the last one returned. Then, batched and with the budget, two-stage requests whose answers may be long
(`--long-explanation-tokens`, mode `two-stage-long`): where the tails are. Histories are the test users' histories of
the run dir. Prints a table and writes bench/results/serve_load.{json,md}, with the other heavy processes seen on the
machine at the start and the end.

    python bench/serve_load.py --config serving/configs/tiny.yaml [--run-dir runs/tiny] [--requests 96]

`--faults`: two-stage load from `--clients` threads while the Ranker replica, then the ReRanker replica, is
SIGKILLed; status and fallback counts, p50/p99 latency against the budget and the time to recover, per phase, to
bench/results/serve_faults.{json,md}. `--fixture DIR` serves the tests' random tiny model (built in DIR) instead of
the run dir's: the mechanics (deadlines, fallbacks, restarts) are the same, the answers are not meaningful.

    python bench/serve_load.py --faults [--fixture /tmp/gr2_faults] [--clients 3] [--allowance-ms 500]

Needs the run dir's models (`make demo` writes runs/tiny) unless `--fixture`. Loopback only: Serve's proxy listens
on 127.0.0.1.
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

from machine import other_heavy_runs  # noqa: E402
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


# ------------------------------------------------------------------------------------------------- --faults

# The tests' random tiny run dir (tests/beam_fixtures.py), for a machine without `make demo`'s runs/tiny: its model
# reads 1024 positions; the re-ranker decodes under the ranking constraint, as the tiny preset does.
FIXTURE_OVERRIDES = ["ranker.engine.max_model_len=1024", "reranker.engine.max_model_len=1024",
                     "reranker.prompt.history_token_budget=40", "reranker.prompt.max_title_chars=16",
                     "ranker.engine.kv_cache_memory_bytes=67108864", "reranker.engine.kv_cache_memory_bytes=67108864",
                     "reranker.sampling.constrained=true", "reranker.sampling.max_explanation_tokens=8"]


def fixture_run_dir(root: Path) -> list[str]:
    """Build the tests' random tiny run dir under `root`; the overrides that serve it."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from beam_fixtures import make_prerank_run_dir

    run_dir = make_prerank_run_dir(root, max_users=40)
    model = run_dir.local_path("models", "midtrain")
    return [f"run_dir={run_dir.root}", f"ranker.model={model}", f"reranker.model={model}", *FIXTURE_OVERRIDES]


def replica_pid(deployment: str, app: str = "gr2") -> int:
    """The PID of the one live replica of `deployment`, from Ray's state API (replica actors are named by class
    `ServeReplica:<app>:<deployment>`)."""
    import ray
    from ray.util.state import list_actors

    class_name = f"ServeReplica:{app}:{deployment}"
    # this driver's own cluster: others' Ray instances may run on the same machine
    alive = list_actors(address=ray.get_runtime_context().gcs_address,
                        filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
    if len(alive) != 1:
        raise RuntimeError(f"expected one live {class_name} actor, found {len(alive)}: {alive}")
    return int(alive[0].pid)


def outcome_of(response) -> tuple[str, str | None]:
    """(outcome, Retry-After): `reranked`, the fallback, `ranker_only`, or `http_<code>[:<reason>]`."""
    if response.status_code == 200:
        answer = response.json()
        return ("reranked" if answer["reranked"] else (answer["fallback"] or "ranker_only")), None
    try:
        reason = response.json().get("reason")
    except ValueError:
        reason = None
    return f"http_{response.status_code}" + (f":{reason}" if reason else ""), response.headers.get("retry-after")


def run_faults(url: str, histories: list[list[int]], budget_ms: int, clients: int = 3, time_limit: float = 300.0,
               max_requests: int = 20000, recover_timeout: float = 180.0, say=print) -> dict:
    """Two-stage requests from `clients` closed-loop threads (each waits the Retry-After of a 503) while the Ranker
    replica and then the ReRanker replica are SIGKILLed, each once the app answers re-ranked again (`3 * clients`
    re-ranked answers: steady, not just the first). Stops by itself: a few rounds after the ReRanker is back, or at
    `time_limit` s / `max_requests` requests (then raises, with what was seen). Returns every response
    ({sent_s, latency_ms, status, outcome, retry_after}, `sent_s` from the start) and the event times."""
    import os
    import signal

    import httpx

    records: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    start = time.monotonic()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            n = index
            while not stop.is_set() and time.monotonic() - start < time_limit:
                with lock:
                    if len(records) >= max_requests:
                        return
                body = {"history": histories[n % len(histories)], "k": 10, "budget_ms": budget_ms}
                n += clients
                sent = time.monotonic()
                try:
                    response = http.post("/v1/recommend", json=body)
                    outcome, retry_after = outcome_of(response)
                    status = response.status_code
                except httpx.HTTPError as err:  # a dropped connection is an outcome too, not a crash of the bench
                    outcome, retry_after, status = f"client_error:{type(err).__name__}", None, 0
                with lock:
                    records.append({"sent_s": round(sent - start, 3), "status": status, "outcome": outcome,
                                    "latency_ms": round(1000 * (time.monotonic() - sent), 1),
                                    "retry_after": retry_after})
                if retry_after and retry_after.isdigit():  # a well-behaved client: back off as the 503 asks
                    stop.wait(int(retry_after))

    def wait_for(t: float, wanted, what: str, count: int = 1) -> float:
        """Seconds from the start until `count` answers for which `wanted(record)` holds, to requests sent at `t` or
        later, arrived (polling the records the clients append)."""
        deadline = time.monotonic() + recover_timeout
        while time.monotonic() < deadline and any(thread.is_alive() for thread in threads):
            with lock:
                arrived = [r["sent_s"] + r["latency_ms"] / 1000 for r in records if r["sent_s"] >= t and wanted(r)]
            if len(arrived) >= count:
                return sorted(arrived)[count - 1]
            time.sleep(0.05)
        raise TimeoutError(f"{what} not seen within {recover_timeout} s of {t:.1f} s (or the clients reached "
                           f"{time_limit} s / {max_requests} requests)")

    def reranked(record: dict) -> bool:
        return record["outcome"] == "reranked"

    events: dict[str, float | int] = {}
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        events["steady_s"] = round(wait_for(0.0, reranked, "re-ranked answers", count=3 * clients), 3)
        for deployment, name in (("Ranker", "ranker"), ("ReRanker", "reranker")):
            if deployment == "ReRanker":  # steady again before the second kill
                wait_for(events["ranker_recovered_s"], reranked, "re-ranked answers", count=3 * clients)
            pid = replica_pid(deployment)
            killed = time.monotonic() - start
            os.kill(pid, signal.SIGKILL)
            say(f"{killed:7.2f} s: SIGKILL {deployment} replica (pid {pid})")
            events[f"{name}_killed_s"], events[f"{name}_pid"] = round(killed, 3), pid
            if deployment == "Ranker":
                events["ranker_answers_s"] = round(wait_for(killed, lambda r: r["status"] == 200, "a 200"), 3)
            back = wait_for(killed, reranked, f"a re-ranked answer after the {deployment} kill")
            events[f"{name}_recovered_s"], events[f"{name}_recovery_s"] = round(back, 3), round(back - killed, 3)
            events[f"{name}_new_pid"] = replica_pid(deployment)
            say(f"{back:7.2f} s: re-ranked again, {back - killed:.2f} s after the {deployment} kill")
        # a few rounds of the recovered app, for its latency
        wait_for(events["reranker_recovered_s"], lambda r: True, "answers after the recovery", count=5 * clients)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return {"records": sorted(records, key=lambda r: r["sent_s"]), "events": events,
            "seconds": round(time.monotonic() - start, 2)}


PHASES = (("steady", None, "ranker_killed_s"), ("ranker killed", "ranker_killed_s", "ranker_recovered_s"),
          ("between", "ranker_recovered_s", "reranker_killed_s"),
          ("reranker killed", "reranker_killed_s", "reranker_recovered_s"), ("recovered", "reranker_recovered_s", None))


def latency_summary(records: list[dict]) -> dict:
    ms = np.array([r["latency_ms"] for r in records]) if records else np.zeros(1)
    return {"requests": len(records), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1),
            "status": dict(sorted(Counter(str(r["status"]) for r in records).items())),
            "outcomes": dict(sorted(Counter(r["outcome"] for r in records).items()))}


def fault_summary(run: dict, budget_ms: int, allowance_ms: float) -> dict:
    """Per phase (by when a request was sent) and overall: status and outcome counts, latency percentiles; the bound
    budget * 1.1 + allowance and what broke it; the recovery times."""
    records, events = run["records"], run["events"]
    phases = []
    for name, begin, end in PHASES:
        lo, hi = events.get(begin, 0.0), events.get(end, float("inf"))
        phases.append({"phase": name, **latency_summary([r for r in records if lo <= r["sent_s"] < hi])})
    bound = budget_ms * 1.1 + allowance_ms
    overall = latency_summary(records)
    figures = {
        "requests": len(records), "seconds": run["seconds"], "budget_ms": budget_ms,
        "bound_ms (budget x 1.1 + allowance)": round(bound, 1),
        "over the bound": sum(r["latency_ms"] > bound for r in records),
        "p50 / budget": round(overall["p50_ms"] / budget_ms, 3),
        "p99 / budget": round(overall["p99_ms"] / budget_ms, 3),
        "max / budget": round(overall["max_ms"] / budget_ms, 3),
        "5xx other than 503": sum(r["status"] >= 500 and r["status"] != 503 for r in records),
        "503 without Retry-After": sum(r["status"] == 503 and not r["retry_after"] for r in records),
        "client errors (no HTTP answer)": sum(r["status"] == 0 for r in records),
        "ranker killed -> first 200 (s)": round(events["ranker_answers_s"] - events["ranker_killed_s"], 2),
        "ranker killed -> re-ranked again (s)": events["ranker_recovery_s"],
        "reranker killed -> re-ranked again (s)": events["reranker_recovery_s"],
    }
    return {"phases": phases, "overall": overall, "figures": figures, "events": events}


def faults_markdown(results: dict) -> str:
    lines = [f"# Serve faults: {results['config']} on {results['machine']}", "",
             f"Command: `{results['command']}`", "",
             (f"{results['clients']} closed-loop clients on 127.0.0.1 (the same cores as the app; each waits the "
              f"Retry-After of a 503) send two-stage requests (budget {results['budget_ms']} ms) while the Ranker "
              "replica and then, once re-ranked answers are back, the ReRanker replica is SIGKILLed (PIDs from Ray's "
              "state API); Serve replaces each. Recovery: from the kill to the first re-ranked answer. Phases "
              f"are by when a request was sent. Bound: budget x 1.1 + {results['allowance_ms']} ms. Models: "
              f"{results['models']}."), "",
             "| phase | requests | status | outcomes | p50 ms | p99 ms | max ms |", "|---|---:|---|---|---:|---:|---:|"]
    for p in results["phases"] + [{"phase": "all", **results["overall"]}]:
        status = ", ".join(f"{k} {v}" for k, v in p["status"].items())
        outcomes = ", ".join(f"{k} {v}" for k, v in p["outcomes"].items())
        lines.append(f"| {p['phase']} | {p['requests']} | {status} | {outcomes} | {p['p50_ms']} | {p['p99_ms']} | "
                     f"{p['max_ms']} |")
    lines += ["", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["figures"].items()]
    others = results["other_runs_seen"]
    lines += ["", "Other runs on the machine at the start or end: " + ("; ".join(f"`{o}`" for o in others) or "none")]
    return "\n".join(lines) + "\n"


def faults_main(args, overrides: list[str], models: str) -> None:
    import os

    from ray import serve

    from serving.__main__ import start

    cfg, url = start(args.config, overrides, "127.0.0.1", args.port)
    budget = args.budget_ms or cfg.ingress.default_budget_ms
    test = RunDir.open(cfg.resolved_run_dir()).read_parquet("data", "test.parquet")
    histories = [h for h in test.column("history").to_pylist() if h][:512]
    others = other_heavy_runs()
    try:
        run = run_faults(url, histories, budget, args.clients, args.max_seconds, args.max_requests)
    finally:
        serve.shutdown()
    others += [line for line in other_heavy_runs() if line not in others]
    results = {"config": args.config, "run_dir": cfg.resolved_run_dir(), "models": models, "budget_ms": budget,
               "clients": args.clients, "allowance_ms": args.allowance_ms, "other_runs_seen": others,
               "machine": f"{os.cpu_count()} CPUs, no GPU" if not _has_gpu() else "GPU",
               "command": "python " + " ".join(sys.argv), **fault_summary(run, budget, args.allowance_ms)}
    out = Path(args.out if args.out != str(RESULTS / "serve_load") else RESULTS / "serve_faults")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(faults_markdown(results))
    print(faults_markdown(results))


def markdown(results: dict) -> str:
    lines = [f"# Serve load: {results['config']} on {results['machine']}", "",
             f"Command: `{results['command']}`", "",
             f"{results['requests']} requests per cell (at most {results['time_limit_s']} s); closed-loop clients on "
             "127.0.0.1 (on the same cores as the app). Budget 60000 ms: every request is served (throughput); "
             f"budget {results['budget_ms']} ms: late re-rankings fall back to the pre-rank list. `two-stage-long`: "
             f"answers with up to {results['long_explanation_tokens']} explanation tokens (the config's: "
             f"{results['explanation_tokens']}).", "",
             "| batching | mode | budget ms | clients | req/s | p50 ms | p95 ms | p99 ms | outcomes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for cell in results["cells"]:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(cell["outcomes"].items()))
        lines.append(f"| {cell['batching']} | {cell['mode']} | {cell['budget_ms']} | {cell['clients']} | "
                     f"{cell['requests_per_s']} | "
                     f"{cell['p50_ms']} | {cell['p95_ms']} | {cell['p99_ms']} | {outcomes} |")
    lines += ["", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["figures"].items()]
    others = results["other_runs_seen"]
    lines += ["", "Other runs on the machine at the start or end: " + ("; ".join(f"`{o}`" for o in others) or "none")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="serving/configs/tiny.yaml")
    parser.add_argument("--run-dir", default=None, help="override the config's run_dir")
    parser.add_argument("--requests", type=int, default=96, help="requests per cell")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per cell at most")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--budget-ms", type=int, default=None, help="request budget (default: the config's)")
    parser.add_argument("--long-explanation-tokens", type=int, default=192,
                        help="the two-stage-long cells' reranker.sampling.max_explanation_tokens")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", default=str(RESULTS / "serve_load"))
    parser.add_argument("--faults", action="store_true", help="kill the Ranker, then the ReRanker replica under load")
    parser.add_argument("--fixture", default=None, help="serve the tests' random tiny model, built in this folder")
    parser.add_argument("--clients", type=int, default=3, help="--faults: client threads")
    parser.add_argument("--max-requests", type=int, default=20000, help="--faults: stop after this many requests")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="--faults: stop after this many seconds")
    parser.add_argument("--allowance-ms", type=float, default=500.0,
                        help="--faults: the bound is budget x 1.1 + this (clients and app share the 2 cores)")
    args = parser.parse_args()
    setup_env()
    setup_logging()
    if args.fixture:
        overrides, models = fixture_run_dir(Path(args.fixture)), "the tests' random tiny model (--fixture)"
    else:
        overrides, models = ([f"run_dir={args.run_dir}"] if args.run_dir else []), "the config's"
    if args.faults:
        return faults_main(args, overrides, models)
    from ray import serve

    from serving.__main__ import start
    from serving.app import build_app
    from serving.config import load_serve_config

    base = load_serve_config(args.config, overrides)
    budget = args.budget_ms or base.ingress.default_budget_ms
    test = RunDir.open(base.resolved_run_dir()).read_parquet("data", "test.parquet")
    histories = [h for h in test.column("history").to_pylist() if h][:512]
    batched = base.ranker.max_batch_size, base.reranker.max_batch_size
    unlimited = base.ingress.max_budget_ms  # throughput cells: every request is served, none falls back
    cells = []
    url = None
    others = other_heavy_runs()

    def measure(batching, sizes, mode, rerank, clients, budget_ms):
        cell = closed_loop(url, histories, rerank, clients, args.requests, args.time_limit, budget_ms)
        cell.update(batching=batching, mode=mode, budget_ms=budget_ms, max_batch_size=list(sizes))
        cells.append(cell)
        print(f"batching {batching:3} {mode:11} budget {budget_ms:5} ms clients {clients:2}: "
              f"{cell['requests_per_s']:6.2f} req/s, p50 {cell['p50_ms']:7.1f} ms, p95 {cell['p95_ms']:7.1f} ms, "
              f"p99 {cell['p99_ms']:7.1f} ms, {cell['outcomes']}", flush=True)

    long_answers = [f"reranker.sampling.max_explanation_tokens={args.long_explanation_tokens}"]
    for batching, sizes, extra in (("on", batched, []), ("off", (1, 1), []), ("on", batched, long_answers)):
        batch_overrides = [*overrides, f"ranker.max_batch_size={sizes[0]}", f"reranker.max_batch_size={sizes[1]}",
                           *extra]
        if url is None:
            _, url = start(args.config, batch_overrides, "127.0.0.1", args.port)
        else:
            cfg = load_serve_config(args.config, batch_overrides)
            serve.run(build_app(cfg.model_dump(mode="json")), name="gr2", route_prefix="/")
        if extra:  # long answers, with the budget: the tails
            closed_loop(url, histories, True, 2, 4, 30, unlimited)  # warm-up
            for clients in args.concurrency:
                measure(batching, sizes, "two-stage-long", True, clients, budget)
            continue
        for mode, rerank in (("ranker-only", False), ("two-stage", True)):
            closed_loop(url, histories, rerank, 2, 4, 30, unlimited)  # warm-up
            for clients in args.concurrency:
                measure(batching, sizes, mode, rerank, clients, unlimited)
        if batching == "on":  # the latency budget: two-stage requests fall back to the pre-rank list at the budget
            for clients in args.concurrency:
                measure(batching, sizes, "two-stage", True, clients, budget)
    serve.shutdown()
    others += [line for line in other_heavy_runs() if line not in others]

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
    for clients in args.concurrency:
        figures[f"two-stage-long p99 / budget at {clients} clients (batched)"] = round(
            cell("on", "two-stage-long", clients, budget)["p99_ms"] / budget, 3)
    import os
    results = {"config": args.config, "run_dir": base.resolved_run_dir(), "models": models, "budget_ms": budget,
               "requests": args.requests, "time_limit_s": args.time_limit,
               "explanation_tokens": base.reranker.sampling.max_explanation_tokens,
               "long_explanation_tokens": args.long_explanation_tokens, "other_runs_seen": others,
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
