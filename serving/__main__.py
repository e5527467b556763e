"""Start the two-stage app on a local Ray (or the cluster named by RAY_ADDRESS) and serve until Ctrl-C.

    python -m serving --config serving/configs/tiny.yaml [key=value ...] [--host 127.0.0.1] [--port 8000]
    python -m serving --config serving/configs/tiny.yaml --smoke      # one request, print the answer, stop (demo)

The file is a Ray Serve config file (also usable as `serve run <file>` / `serve deploy <file>`); overrides apply to
its `applications[0].args` (e.g. `reranker.enabled=false`, `ingress.default_budget_ms=500`). Host and port default
to the file's `http_options`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import threading

from pipelines.common import REPO_ROOT, init_ray, setup_env, setup_logging
from rec.config import ConfigError
from serving.config import ServeConfig, load_serve_config, read_serve_file

log = logging.getLogger("gr2.serving")
APP_NAME = "gr2"


def local_cpus(cfg: ServeConfig) -> int:
    """Logical CPUs a private local Ray needs for every replica of the app (at least what the machine has)."""
    import os

    sections = [cfg.ranker, cfg.ingress] + ([cfg.reranker] if cfg.reranker.enabled else [])
    needed = sum(s.num_cpus * ((s.autoscaling or {}).get("max_replicas") or s.num_replicas) for s in sections)
    return max(math.ceil(needed), os.cpu_count() or 1)


def start(config_file: str | None, overrides: list[str], host: str | None = None, port: int | None = None):
    """Start Serve with the app; returns (ServeConfig, base url). Blocks until every replica is up."""
    from ray import serve

    from serving.app import build_app

    cfg = load_serve_config(config_file, overrides)
    http = read_serve_file(config_file).get("http_options", {}) if config_file else {}
    host = host or http.get("host", "127.0.0.1")
    port = port or int(http.get("port", 8000))
    cfg.resolved_run_dir()  # fail here, not in a replica
    init_ray(local_cpus(cfg))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg.model_dump(mode="json")), name=APP_NAME, route_prefix="/")
    return cfg, f"http://{host}:{port}"


def stop(private_ray: bool) -> None:
    """Stop serving. On the private local Ray this process started: delete the app (its replicas drain and stop),
    then stop Ray, which takes Serve's controller and proxy with it. `serve.shutdown()` instead asks the controller
    with a call that ends only when the controller kills itself, and as the controller is created with
    `max_task_retries=-1`, Ray logs "Task ServeController.graceful_shutdown failed ... will be retried" on every
    clean exit. Attached to a cluster (RAY_ADDRESS), Serve is shut down there as before."""
    import ray
    from ray import serve

    if not private_ray:
        serve.shutdown()
        return
    serve.delete(APP_NAME)
    ray.shutdown()


def smoke(cfg: ServeConfig, url: str) -> None:
    """One real request to the running app: the first test user's history, re-ranked, with the explanation."""
    import json
    import urllib.request

    from rec.io import RunDir

    history = RunDir.open(cfg.resolved_run_dir()).read_parquet("data", "test.parquet").column("history")[0].as_py()
    body = json.dumps({"history": history, "k": 5, "explain": True}).encode()
    request = urllib.request.Request(f"{url}/v1/recommend", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    print(f"POST {url}/v1/recommend {{\"history\": {history}, \"k\": 5, \"explain\": true}}")
    print(json.dumps(answer, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the two-stage GR2 recommender (Ray Serve).")
    parser.add_argument("--config", default=str(REPO_ROOT / "serving" / "configs" / "tiny.yaml"),
                        help="Serve config file (serving/configs/<preset>.yaml)")
    parser.add_argument("--host", default=None, help="HTTP host (default: the file's http_options.host)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the file's http_options.port)")
    parser.add_argument("--smoke", action="store_true",
                        help="send one request (the first test user's history) over HTTP, print the answer, stop")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the app's args")
    args = parser.parse_args(argv)
    setup_env()
    setup_logging()
    private_ray = not os.environ.get("RAY_ADDRESS")  # init_ray starts a local Ray of this process's own
    try:
        cfg, url = start(args.config, args.overrides, args.host, args.port)
    except (ConfigError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    log.info("serving %s (re-ranker %s) at %s/v1/recommend; docs at %s/docs; Ctrl-C stops", cfg.ranker.model,
             cfg.reranker.model if cfg.reranker.enabled else "off", url, url)
    if args.smoke:
        try:
            smoke(cfg, url)
        finally:
            stop(private_ray)
        return
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    try:
        terminated.wait()
    except KeyboardInterrupt:
        pass
    stop(private_ray)


if __name__ == "__main__":
    main()
