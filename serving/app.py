"""The two-stage GR2 recommender on Ray Serve: HTTP ingress -> Ranker (beam search over SIDs) -> ReRanker (LLM).

- `Ranker`: the mid-trained model decoding under the SID trie (`rec.engines.SidRanker`, the prerank stage's code)
  returns the top-N catalogue items with their beam scores; concurrent requests are batched (`@serve.batch`).
- `ReRanker`: a re-ranker checkpoint (SFT or RL) on a vLLM engine (`rec.engines.Reranker`, the evaluate stage's
  code: prompt, generate, parse); batched. A request whose deadline passed while it queued is not generated.
- `Ingress` (FastAPI): `POST /v1/recommend`, `GET /v1/items/{item_id}`, `GET /healthz`, OpenAPI docs at `/docs`.
  Each request has a latency budget: when the re-ranker does not answer within what the ranker left of it, fails,
  is down, or answers with something that is not a ranking of the candidates, the pre-rank order is returned and
  `fallback` says why.

Run locally:  python -m serving --config serving/configs/tiny.yaml            (then see README: curl ...)
              serve run serving/configs/tiny.yaml                              (Serve's own CLI, same file)
Cluster:      serve deploy serving/configs/qwen3_8b.yaml, or cluster/rayservice.yaml on KubeRay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipelines.common import REPO_ROOT, setup_env, setup_logging, start_reranker, start_sid_ranker
from rec.config import ConfigError
from rec.io import RunDir
from rec.rerank import catalogue
from serving.config import ServeConfig, load_serve_config

log = logging.getLogger("gr2.serving")

DEFAULT_CONFIG = os.environ.get("GR2_SERVE_CONFIG", str(REPO_ROOT / "serving" / "configs" / "tiny.yaml"))


def _checkpoint(cfg: ServeConfig, path: str, writer: str) -> str:
    model = cfg.model_path(path)
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {model} (config.json missing); the {writer} stage writes it")
    return model


def sample_items(run_dir: RunDir, count: int) -> list[int]:
    return run_dir.read_parquet("sid", "sid_map.parquet").column("item_id").slice(0, count).to_pylist()


class _EngineReplica:
    """A model replica: its engine lives on one thread of its own (vLLM's CPU build binds OpenMP threads to the
    thread that started it), and batches run there while the replica's event loop keeps accepting requests."""

    def _start(self, build):
        setup_env()
        setup_logging()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=type(self).__name__)
        return self._thread.submit(build).result()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)


@serve.deployment(name="Ranker")
class Ranker(_EngineReplica):
    def __init__(self, config: dict[str, Any]):
        self.cfg = cfg = ServeConfig.model_validate(config)
        r = cfg.ranker
        run_dir = RunDir.open(cfg.resolved_run_dir())
        model = _checkpoint(cfg, r.model, "midtrain")
        codebook_size = int(run_dir.read_json("sid", "report.json")["codebook_size"])

        def build():
            ranker, lock = start_sid_ranker(run_dir, model, codebook_size, r.engine, r.backend, r.num_beams, r.top_n,
                                            r.num_cpus, r.num_gpus, r.bind_cores)
            ranker.rank([sample_items(run_dir, 1)])  # the first call is slow: keep it out of the first request
            return ranker, lock

        self.ranker, self._core_lock = self._start(build)
        self.rank.set_max_batch_size(r.max_batch_size)
        self.rank.set_batch_wait_timeout_s(r.batch_wait_timeout_s)
        log.info("Ranker: %s, beam %d, top %d, batches of up to %d", model, r.num_beams, r.top_n, r.max_batch_size)

    @serve.batch
    async def rank(self, histories: list[list[int]]) -> list[list[tuple[int, float]]]:
        return await self._run(self.ranker.rank, histories, self.cfg.ranker.exclude_history)


@serve.deployment(name="ReRanker")
class ReRanker(_EngineReplica):
    def __init__(self, config: dict[str, Any]):
        self.cfg = cfg = ServeConfig.model_validate(config)
        r = cfg.reranker
        model = _checkpoint(cfg, r.model, "sft (or rl)")
        settings = cfg.reranker_settings(model)  # prompted exactly as it was trained; lengths checked
        prompt, eos = settings.prompt, settings.eos_token
        run_dir = RunDir.open(cfg.resolved_run_dir())

        def build():
            built = start_reranker(run_dir, model, prompt, eos, r.sampling, r.engine, r.num_cpus, r.num_gpus,
                                   r.bind_cores, seed=cfg.seed)
            items = sample_items(run_dir, cfg.ranker.top_n + 1)
            built[0].rerank([items[:1]], [items[1:]])  # warm-up, as in the Ranker
            return built

        self.reranker, bound, self._core_lock = self._start(build)
        self.rerank.set_max_batch_size(r.max_batch_size)
        self.rerank.set_batch_wait_timeout_s(r.batch_wait_timeout_s)
        log.info("ReRanker: %s on cores %s, batches of up to %d", model, bound or "-", r.max_batch_size)

    @serve.batch
    async def rerank(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each request: {history, candidates, deadline (time.time() seconds)} -> {ranking, reason, explanation,
        generated_tokens}. Requests already past their deadline are answered `expired` without generating."""
        now = time.time()
        live = [n for n, request in enumerate(requests) if request["deadline"] > now]
        out = [{"ranking": list(r["candidates"]), "reason": "expired", "explanation": "", "generated_tokens": 0}
               for r in requests]
        if live:
            results = await self._run(self.reranker.rerank, [requests[n]["history"] for n in live],
                                      [requests[n]["candidates"] for n in live])
            for n, result in zip(live, results):
                out[n] = {"ranking": result.ranking, "reason": result.reason, "explanation": result.explanation,
                          "generated_tokens": result.generated_tokens}
        return out


# ------------------------------------------------------------------------------------------------- HTTP ingress

api = FastAPI(title="GR2 recommender",
              description="Two-stage recommendation: beam search over semantic IDs, then LLM re-ranking.")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[StrictInt] = Field(description="The user's item ids, oldest first (longer histories keep the "
                                                 "most recent items). Empty: a cold-start list (see the config).")
    k: StrictInt = Field(default=10, description="Items to return (1 .. the ranker's top_n).")
    rerank: StrictBool = Field(default=True, description="Re-rank the pre-ranker's list with the LLM.")
    explain: StrictBool = Field(default=False, description="Return the re-ranker's explanation.")
    budget_ms: StrictInt | None = Field(default=None, description="Latency budget; past it the pre-rank order is "
                                                                 "returned. Default: the config's.")


class ItemOut(BaseModel):
    item_id: int
    title: str
    sid: str
    prerank_position: int | None = Field(description="1-based position in the pre-ranker's list (null: cold start)")
    score: float | None = Field(description="The pre-ranker's beam log-probability (null: cold start)")


class RecommendResponse(BaseModel):
    items: list[ItemOut]
    reranked: bool = Field(description="Whether the order is the re-ranker's.")
    fallback: str | None = Field(description="Why the pre-rank order was returned although re-ranking was asked for "
                                             "(timeout, expired, reranker_error:<type>, invalid_answer:<reason>, "
                                             "budget_spent, disabled, cold_start); null otherwise.")
    explanation: str | None = None
    history_used: int = Field(description="History items the models saw (after keeping the most recent).")
    budget_ms: int
    timings_ms: dict[str, float]


class ItemInfo(BaseModel):
    item_id: int
    title: str
    sid: str


def invalid(field: str, message: str, value: Any, kind: str = "value_error") -> RequestValidationError:
    """A 422 in FastAPI's own error format, naming the body field."""
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": kind, "input": value}])


_BODY_LIMIT: dict[str, int] = {}


def set_body_limit(max_bytes: int) -> None:
    """Set by the ingress replica at start-up. (Serve hands the replica a serialized copy of the FastAPI app, so the
    middleware reads the limit from this module rather than from the app object the driver built.)"""
    _BODY_LIMIT["bytes"] = max_bytes


class BodyLimit:
    """ASGI middleware: request bodies over the ingress's `max_body_bytes` get 413 (by Content-Length, or while a
    chunked body streams in)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        limit = _BODY_LIMIT.get("bytes")
        if scope["type"] != "http" or limit is None:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, receive, send, limit)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._too_large(scope, receive, send, limit)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(scope, receive, send, limit):
        response = JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
        await response(scope, receive, send)


api.add_middleware(BodyLimit)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, ranker: DeploymentHandle, reranker: DeploymentHandle | None, config: dict[str, Any]):
        setup_env()
        setup_logging()
        self.cfg = cfg = ServeConfig.model_validate(config)
        self.ranker, self.reranker = ranker, reranker
        run_dir = RunDir.open(cfg.resolved_run_dir())
        self.sid_of, self.title_of = catalogue(run_dir)
        counts = Counter(item for items in run_dir.read_parquet("data", "train.parquet").column("item_ids").to_pylist()
                         for item in items)
        self.popular = [item for item, _ in counts.most_common(cfg.ranker.top_n)]
        set_body_limit(cfg.ingress.max_body_bytes)

    def _item(self, item_id: int, position: int | None = None, score: float | None = None) -> ItemOut:
        return ItemOut(item_id=item_id, title=self.title_of.get(item_id, ""), sid=self.sid_of[item_id],
                       prerank_position=position, score=score)

    def _check(self, body: RecommendRequest) -> int:
        top_n, ingress = self.cfg.ranker.top_n, self.cfg.ingress
        if not 1 <= body.k <= top_n:
            raise invalid("k", f"k must be between 1 and {top_n}", body.k)
        budget = body.budget_ms if body.budget_ms is not None else ingress.default_budget_ms
        if not 1 <= budget <= ingress.max_budget_ms:
            raise invalid("budget_ms", f"budget_ms must be between 1 and {ingress.max_budget_ms}", body.budget_ms)
        unknown = sorted({i for i in body.history if i not in self.sid_of})
        if unknown:
            raise invalid("history", f"unknown item ids: {unknown[:20]}" + (" ..." if len(unknown) > 20 else ""),
                          unknown, kind="unknown_items")
        if not body.history and ingress.cold_start == "reject":
            raise invalid("history", "history is empty: give at least one item id", body.history)
        return budget

    @api.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        start = time.perf_counter()
        budget = self._check(body)
        history = body.history[-self.cfg.ingress.max_history_items:]
        timings: dict[str, float] = {}

        def answer(items: list[ItemOut], reranked: bool, fallback: str | None, explanation: str | None = None):
            timings["total"] = round(1000 * (time.perf_counter() - start), 2)
            return RecommendResponse(items=items[: body.k], reranked=reranked, fallback=fallback,
                                     explanation=explanation if body.explain else None, history_used=len(history),
                                     budget_ms=budget, timings_ms=timings)

        if not history:
            return answer([self._item(i) for i in self.popular], False, "cold_start" if body.rerank else None)
        try:
            ranked = await self.ranker.rank.remote(history)
        except Exception as err:  # noqa: BLE001 - no list to fall back to
            log.exception("ranker failed")
            return JSONResponse({"detail": f"ranker unavailable: {type(err).__name__}"}, status_code=503)
        timings["ranker"] = round(1000 * (time.perf_counter() - start), 2)
        score = {item: s for item, s in ranked}
        prerank = [item for item, _ in ranked]
        position = {item: n + 1 for n, item in enumerate(prerank)}

        def items_in(order: list[int]) -> list[ItemOut]:
            return [self._item(i, position[i], score[i]) for i in order]

        if not body.rerank:
            return answer(items_in(prerank), False, None)
        if self.reranker is None:
            return answer(items_in(prerank), False, "disabled")
        left = budget / 1000 - (time.perf_counter() - start)
        if left <= 0:
            return answer(items_in(prerank), False, "budget_spent")
        rerank_start = time.perf_counter()
        response = self.reranker.rerank.remote({"history": history, "candidates": prerank,
                                                "deadline": time.time() + left})
        try:
            result = await asyncio.wait_for(response, timeout=left)
        except TimeoutError:
            response.cancel()
            result = {"reason": "timeout"}
        except Exception as err:  # noqa: BLE001 - a failed or missing replica must not fail the request
            log.warning("re-ranker failed (%s: %s); returning the pre-rank order", type(err).__name__, err)
            result = {"reason": f"reranker_error:{type(err).__name__}"}
        timings["reranker"] = round(1000 * (time.perf_counter() - rerank_start), 2)
        reason = result["reason"]
        if reason is None:
            return answer(items_in(result["ranking"]), True, None, result["explanation"])
        if reason not in ("timeout", "expired") and not reason.startswith("reranker_error"):
            reason = f"invalid_answer:{reason}"
        return answer(items_in(prerank), False, reason, result.get("explanation"))

    @api.get("/v1/items/{item_id}", response_model=ItemInfo)
    async def item(self, item_id: int) -> ItemInfo:
        if item_id not in self.sid_of:
            return JSONResponse({"detail": f"unknown item id {item_id}"}, status_code=404)
        return ItemInfo(item_id=item_id, title=self.title_of.get(item_id, ""), sid=self.sid_of[item_id])

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "ranker": self.cfg.ranker.model,
                "reranker": self.cfg.reranker.model if self.reranker is not None else None}


# ------------------------------------------------------------------------------------------------- composition


def check_reranker(cfg: ServeConfig) -> None:
    """Refuse, before any replica starts, a re-ranker config that contradicts its model's gr2_rerank.json (lengths)
    or whose engine cannot hold prompt + answer. Where the run dir is not known here (it may be set only on the
    replicas) the replica's own check at start-up is the one that counts."""
    try:
        model = cfg.model_path(cfg.reranker.model)
    except ConfigError:
        model = "<unresolved>"  # the config's own prompt and lengths are still checked
    cfg.reranker_settings(model)


def build_app(args: dict[str, Any]):
    """Serve application builder (`import_path: serving.app:build_app`). `args` are ServeConfig fields, or
    {"config": <serve config file>, "overrides": ["key=value", ...]} to take that file's args."""
    args = dict(args or {})
    if "config" in args:
        path = Path(args.pop("config"))
        if not path.is_absolute() and not path.exists():  # relative to the repository (a cluster's working dir)
            path = REPO_ROOT / path
        cfg = load_serve_config(path, args.pop("overrides", None))
        if args:
            raise ValueError(f"with `config`, the only other key is `overrides`; got {sorted(args)}")
    else:
        cfg = ServeConfig.model_validate(args)
    if cfg.reranker.enabled:
        check_reranker(cfg)
    config = cfg.model_dump(mode="json")
    ranker = Ranker.options(**cfg.ranker.deployment_options()).bind(config)
    reranker = ReRanker.options(**cfg.reranker.deployment_options()).bind(config) if cfg.reranker.enabled else None
    return Ingress.options(**cfg.ingress.deployment_options()).bind(ranker, reranker, config)


app = build_app({"config": DEFAULT_CONFIG})
