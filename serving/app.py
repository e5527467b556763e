"""The two-stage GR2 recommender on Ray Serve: HTTP ingress -> Ranker (beam search over SIDs) -> ReRanker (LLM).

- `Ranker`: the mid-trained model decoding under the SID trie (`rec.engines.sid_ranker.SidRanker`, the prerank stage's code)
  returns the top-N catalogue items with their beam scores; concurrent requests are batched (`@serve.batch`).
- `ReRanker`: a re-ranker checkpoint (SFT or RL) on vLLM's async engine (`rec.engines.async_reranker.AsyncReranker`:
  the evaluate stage's prompt, constraint and parse): each request joins the engine's running batch as it arrives
  (continuous batching) and is aborted at its deadline. A request whose deadline passed while it queued is not sent.
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
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from pipelines.common import REPO_ROOT, setup_env, setup_logging, start_async_reranker, start_sid_ranker
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
    async def rank(self, requests: list[dict[str, Any]]) -> list[list[tuple[int, float]] | None]:
        """Each request: {history (the prompt's), exclude (items never proposed), deadline (time.time() seconds)}.
        Requests already past their deadline get None without a search: their ingress has stopped waiting."""
        now = time.time()
        live = [n for n, request in enumerate(requests) if request["deadline"] > now]
        out: list[list[tuple[int, float]] | None] = [None] * len(requests)
        if live:
            exclude = [requests[n]["exclude"] for n in live] if self.cfg.ranker.exclude_history else None
            ranked = await self._run(self.ranker.rank, [requests[n]["history"] for n in live], False, exclude)
            for n, items in zip(live, ranked):
                out[n] = items
        return out

    async def ping(self) -> bool:
        """The ingress's probe: answered by the replica's event loop, whatever the engine is doing."""
        return True


@serve.deployment(name="ReRanker")
class ReRanker:
    """A re-ranker checkpoint on vLLM's async engine (`rec.engines.async_reranker.AsyncReranker`): every request goes
    to the engine as it arrives and joins its running batch at the next step (continuous batching, up to
    `max_batch_size` requests decoded together); at its deadline it is aborted, so the engine stops generating for
    it and the answer says `timeout`. The engine core runs in a child process bound to the replica's cores."""

    async def __init__(self, config: dict[str, Any]):
        setup_env()
        setup_logging()
        cfg = ServeConfig.model_validate(config)
        r = cfg.reranker
        model = _checkpoint(cfg, r.model, "sft (or rl)")
        settings = cfg.reranker_settings(model)  # prompted exactly as it was trained; lengths checked
        run_dir = RunDir.open(cfg.resolved_run_dir())
        self.reranker, bound, self._core_lock = start_async_reranker(
            run_dir, model, settings.prompt, settings.eos_token, r.sampling, r.engine, r.num_cpus, r.num_gpus,
            r.bind_cores, seed=cfg.seed, max_num_seqs=r.max_batch_size)
        items = sample_items(run_dir, cfg.ranker.top_n + 1)
        await self.reranker.rerank(items[:1], items[1:])  # the first request is slow: keep it out of the first user's
        log.info("ReRanker: %s on cores %s, up to %d requests decoded together", model, bound or "-", r.max_batch_size)

    async def rerank(self, request: dict[str, Any]) -> dict[str, Any]:
        """{history, candidates, deadline (time.time() seconds)} -> {ranking, reason, explanation, generated_tokens}.
        A request already past its deadline is answered `expired` without generating; one still generating at its
        deadline is aborted and answered `timeout`."""
        left = request["deadline"] - time.time()
        if left <= 0:
            return {"ranking": list(request["candidates"]), "reason": "expired", "explanation": "",
                    "generated_tokens": 0}
        result = await self.reranker.rerank(request["history"], request["candidates"], timeout_s=left)
        return {"ranking": result.ranking, "reason": result.reason, "explanation": result.explanation,
                "generated_tokens": result.generated_tokens}

    async def load(self) -> dict[str, int]:
        """The engine's load: requests `running` and `waiting` at its latest step, `steps` and `generated_tokens`
        over its life (`rec.engines.async_reranker.EngineLoad`), and `unfinished` requests in the engine now."""
        return {**dataclasses.asdict(self.reranker.load),
                "unfinished": self.reranker.engine.get_num_unfinished_requests()}

    async def ping(self) -> bool:
        """The ingress's probe: answered by the replica's event loop, whatever the engine is doing."""
        return True

    async def check_health(self) -> None:
        """Serve's health check: fails once the engine process died, and Serve replaces the replica."""
        await self.reranker.check_health()


# ------------------------------------------------------------------------------------------------- HTTP ingress

API_DESCRIPTION = """Two-stage recommendation: beam search over semantic IDs, then LLM re-ranking.

Every request has a latency budget (`budget_ms`), counted from its arrival at the ingress; the answer is sent within
it. **200**: the items. **422** (FastAPI's error format, `detail[].loc/msg/type`): a body that is not strict JSON
(invalid UTF-8, NaN or Infinity, a lone surrogate escape, nesting deeper than 16, a content-type that is not JSON),
wrong types, unknown fields, unknown item ids, `k` or `budget_ms` out of range. **413**: a body over the size
limit. **503** with `Retry-After` and `{"detail", "reason"}`: no pre-rank list within the budget, because the ranker
is unavailable (`ranker_unavailable`: dead, restarting or unreachable), did not answer in time (`ranker_timeout`) or
failed (`ranker_error:<type>`). The re-ranker never fails a request: the pre-rank order comes back and `fallback`
says why (`timeout`: it answered too slowly; `reranker_unavailable`: no live replica; `expired`, `budget_spent`,
`reranker_error:<type>`, `invalid_answer:<reason>`, `disabled`, `cold_start`)."""

api = FastAPI(title="GR2 recommender", description=API_DESCRIPTION)


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[StrictInt] = Field(description="The user's item ids, oldest first. The models see the most recent "
                                                 "ones (ingress.max_history_items); none of them is recommended. "
                                                 "Empty: a cold-start list (see the config).")
    k: StrictInt = Field(default=10, description="Items to return (1 .. the ranker's top_n).")
    rerank: StrictBool = Field(default=True, description="Re-rank the pre-ranker's list with the LLM.")
    explain: StrictBool = Field(default=False, description="Return the re-ranker's explanation.")
    budget_ms: StrictInt | None = Field(default=None, description="Latency budget from arrival; past it the pre-rank "
                                                                 "order is returned. Default: the config's.")


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
                                             "(timeout, reranker_unavailable, expired, reranker_error:<type>, "
                                             "invalid_answer:<reason>, budget_spent, disabled, cold_start); null "
                                             "otherwise.")
    explanation: str | None = None
    history_used: int = Field(description="History items the models saw (after keeping the most recent).")
    budget_ms: int
    timings_ms: dict[str, float]


class ItemInfo(BaseModel):
    item_id: int
    title: str
    sid: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrors(BaseModel):
    detail: list[FieldError]


class Unavailable(BaseModel):
    detail: str = Field(description="What happened and what to do.")
    reason: str = Field(description="ranker_unavailable, ranker_timeout or ranker_error:<type>")


def invalid(field: str, message: str, value: Any, kind: str = "value_error") -> RequestValidationError:
    """A 422 in FastAPI's own error format, naming the body field."""
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": kind, "input": value}])


# --- the request body, parsed strictly. FastAPI's own parsing answers 400 for invalid UTF-8 and deep nesting, and
# accepts NaN / Infinity / "\ud800", whose 422 then fails to render (500): the body is parsed here instead.

MAX_JSON_DEPTH = 16
"""The request nests 2 deep; deeper bodies are refused before json.loads recurses into them."""
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _json_invalid(message: str, position: int = 0) -> RequestValidationError:
    """FastAPI's own error for a body that is not JSON (type json_invalid, loc ["body", position])."""
    return RequestValidationError([{"type": "json_invalid", "loc": ("body", position),
                                    "msg": f"JSON decode error: {message}", "input": {}, "ctx": {"error": message}}])


def _non_finite(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259): send finite numbers")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise ValueError(f"{text} overflows a double: send finite numbers")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate_at(value: Any, path: tuple = ()) -> tuple | None:
    """The path of the first string (or key) in parsed JSON with a lone UTF-16 surrogate, which json.loads accepts
    from an escape like "\\ud800" and which cannot be written back as UTF-8; None if there is none."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and not _encodable(key):
            return (*path, ascii(key))
        found = _lone_surrogate_at(item, (*path, key))
        if found is not None:
            return found
    return None


def parse_recommend_body(raw: bytes, content_type: str | None) -> RecommendRequest:
    """The body of POST /v1/recommend: UTF-8 JSON of finite numbers and valid Unicode, at most MAX_JSON_DEPTH deep,
    then the request model; anything else raises RequestValidationError (a 422) saying what to fix.

    >>> parse_recommend_body(b'{"history": [1, 2], "k": 3}', "application/json").k
    3
    """
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise RequestValidationError([{"type": "content_type", "loc": ("body",), "input": None,
                                       "msg": f"content-type {media} is not JSON: send the body as JSON with "
                                              "content-type: application/json"}])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _json_invalid(f"invalid UTF-8 at byte {err.start}: send the body as UTF-8", err.start) from None
    if not text.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        depth += 1 if token in ("[", "{") else -1 if token in ("]", "}") else 0
        if depth > MAX_JSON_DEPTH:
            raise _json_invalid(f"nested deeper than {MAX_JSON_DEPTH} levels at character {match.start()}: the "
                                "request is one flat object", match.start())
    try:
        value = json.loads(text, parse_constant=_non_finite, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise _json_invalid(err.msg, err.pos) from None
    except (ValueError, RecursionError) as err:  # NaN / Infinity, an overflowing number, an over-long integer
        raise _json_invalid(str(err)) from None
    bad = _lone_surrogate_at(value)
    if bad is not None:
        raise RequestValidationError([{"type": "string_unicode", "loc": ("body", *bad), "input": None,
                                       "msg": "a lone UTF-16 surrogate escape (e.g. \\ud800 without its pair) is not "
                                              "text: send valid Unicode"}])
    try:
        return RecommendRequest.model_validate(value)
    except ValidationError as err:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])}
                                      for error in err.errors(include_url=False)]) from None


RECOMMEND_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": RecommendRequest.model_json_schema()}}}}


def _renderable(value: Any) -> Any:
    """`value` if it renders as strict JSON in UTF-8, else its ascii() (NaN, Infinity, lone surrogates)."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return ascii(value)
    return value


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, except that an error's parts that cannot be rendered (an echoed NaN or lone surrogate, from a
    path or query parameter too) are sent as their ascii() rather than failing the response with a 500."""
    errors = []
    for error in jsonable_encoder(exc.errors()):
        error = {key: _renderable(value) for key, value in error.items()}
        if isinstance(error.get("loc"), list):
            error["loc"] = [_renderable(part) for part in error["loc"]]
        errors.append(error)
    return JSONResponse({"detail": errors}, status_code=422)


# --- deadlines and replica health

ARRIVAL = "gr2.arrival"
"""ASGI scope key: time.monotonic() when the request reached the ingress replica (set by BodyLimit, the first
middleware), the origin of its budget."""

UNAVAILABLE_ERRORS = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)
"""What a handle call raises when no live replica can take it: dead, restarting or unreachable (ActorDiedError and
ActorUnavailableError are RayActorErrors)."""


async def result_within(response: DeploymentResponse, timeout_s: float) -> Any:
    """The call's result, or TimeoutError (the call cancelled) once `timeout_s` passed. Unlike asyncio.wait_for this
    does not wait for the cancelled call to wind down, which would spend time past the deadline."""
    task = asyncio.ensure_future(response)
    done, _ = await asyncio.wait({task}, timeout=max(timeout_s, 0.0))
    if not done:
        task.cancel()
        response.cancel()
        # Serve may end the cancelled call with RequestCancelledError rather than CancelledError: retrieve it, or
        # asyncio logs "exception was never retrieved" for every cancelled call
        task.add_done_callback(lambda finished: finished.cancelled() or finished.exception())
        raise TimeoutError
    return task.result()


class DeploymentHealth:
    """What the ingress knows of a model deployment from its own calls. A call that raised one of
    UNAVAILABLE_ERRORS, or went unanswered and whose follow-up probe (`ping`, answered by a live replica's event loop
    in milliseconds) went unanswered for `probe_timeout_s`, marks it down; while it is down requests do not wait on
    it, and probes repeat until one answers, which marks it up. One probe at a time."""

    def __init__(self, name: str, handle: DeploymentHandle, probe_timeout_s: float):
        self.name, self.handle, self.probe_timeout_s = name, handle, probe_timeout_s
        self.down_since: float | None = None
        self.why = ""
        self._probe: asyncio.Task | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, err: BaseException) -> None:
        """A call raised one of UNAVAILABLE_ERRORS."""
        self._mark_down(type(err).__name__)
        self._start_probe()

    def unanswered(self) -> None:
        """A call ran past its deadline: the deployment is slow or gone; the probe tells which."""
        self._start_probe()

    def answered(self) -> None:
        if self.down_since is not None:
            log.warning("%s answers again after %.1f s", self.name, time.monotonic() - self.down_since)
            self.down_since = None

    def _mark_down(self, why: str) -> None:
        self.why = why
        if self.down_since is None:
            log.warning("%s unavailable (%s): requests stop waiting on it until a probe answers", self.name, why)
            self.down_since = time.monotonic()

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_answered())

    async def _probe_until_answered(self) -> None:
        while True:
            try:
                await result_within(self.handle.ping.remote(), self.probe_timeout_s)
            except TimeoutError:
                self._mark_down(f"no answer to a probe within {self.probe_timeout_s} s")
            except Exception as err:  # noqa: BLE001 - any failure to answer is "not available"
                self._mark_down(type(err).__name__)
                await asyncio.sleep(0.1)  # these fail fast: retry without spinning
            else:
                self.answered()
                return


_BODY_LIMIT: dict[str, int] = {}


def set_body_limit(max_bytes: int) -> None:
    """Set by the ingress replica at start-up. (Serve hands the replica a serialized copy of the FastAPI app, so the
    middleware reads the limit from this module rather than from the app object the driver built.)"""
    _BODY_LIMIT["bytes"] = max_bytes


class BodyLimit:
    """ASGI middleware: stamps the request's arrival (its budget's origin); request bodies over the ingress's
    `max_body_bytes` get 413 (by Content-Length, or while a chunked body streams in)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope[ARRIVAL] = time.monotonic()
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
        probe = cfg.ingress.probe_timeout_s
        self.ranker_health = DeploymentHealth("Ranker", ranker, probe)
        self.reranker_health = DeploymentHealth("ReRanker", reranker, probe) if reranker is not None else None
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

    def _unavailable(self, reason: str, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail, "reason": reason}, status_code=503,
                            headers={"Retry-After": str(self.cfg.ingress.retry_after_s)})

    async def _rank(self, history: list[int], sent: list[int], deadline: float,
                    budget: int) -> list[tuple[int, float]] | JSONResponse:
        """The Ranker's list for `history` (none of `sent` in it), or the 503 to send when there is none by the
        deadline (time.monotonic())."""
        health, retry = self.ranker_health, self.cfg.ingress.retry_after_s

        def down() -> JSONResponse:
            return self._unavailable("ranker_unavailable", f"the ranker is unavailable (restarting or unreachable: "
                                                           f"{health.why}); retry after {retry} s")

        if health.down:  # do not spend the budget waiting on a deployment known to be down
            return down()
        left = deadline - time.monotonic()
        if left <= 0:  # a budget below ingress.reply_reserve_ms
            return self._unavailable("ranker_timeout", f"budget_ms {budget} leaves the ranker no time: send a "
                                                       f"larger budget_ms (over {self.cfg.ingress.reply_reserve_ms})")
        # the whole sent history is excluded, also the items older than the prompt's window
        response = self.ranker.rank.remote({"history": history, "exclude": list(dict.fromkeys(sent)),
                                            "deadline": time.time() + left})
        try:
            ranked = await result_within(response, left)
        except TimeoutError:
            ranked = None
        except UNAVAILABLE_ERRORS as err:
            health.failed(err)
            return down()
        except Exception as err:  # no list to fall back to
            log.exception("ranker failed")
            return self._unavailable(f"ranker_error:{type(err).__name__}",
                                     f"the ranker failed ({type(err).__name__}: {err}); retry after {retry} s")
        if ranked is None:  # not answered by the deadline (or the Ranker dropped it as expired)
            health.unanswered()
            if health.down:
                return down()
            return self._unavailable("ranker_timeout", f"the ranker did not answer within the budget ({budget} ms): "
                                                       f"retry after {retry} s, or send a larger budget_ms")
        health.answered()
        return ranked

    async def _rerank(self, history: list[int], prerank: list[int], left: float) -> dict[str, Any]:
        """The ReRanker's answer ({ranking, reason, explanation}), or {reason} when it has none within `left` s."""
        health = self.reranker_health
        if health.down:
            return {"reason": "reranker_unavailable"}
        response = self.reranker.rerank.remote({"history": history, "candidates": prerank,
                                                "deadline": time.time() + left})
        try:
            result = await result_within(response, left)
        except TimeoutError:
            health.unanswered()
            return {"reason": "reranker_unavailable" if health.down else "timeout"}
        except UNAVAILABLE_ERRORS as err:
            health.failed(err)
            return {"reason": "reranker_unavailable"}
        except Exception as err:  # noqa: BLE001 - a failed replica must not fail the request
            log.warning("re-ranker failed (%s: %s); returning the pre-rank order", type(err).__name__, err)
            return {"reason": f"reranker_error:{type(err).__name__}"}
        health.answered()
        return result

    @api.post("/v1/recommend", response_model=RecommendResponse, openapi_extra=RECOMMEND_BODY,
              responses={422: {"model": ValidationErrors, "description": "A malformed or invalid body"},
                         503: {"model": Unavailable, "description": "No pre-rank list within the budget (with "
                                                                    "Retry-After)"}})
    async def recommend(self, request: Request) -> RecommendResponse:
        arrival = request.scope.get(ARRIVAL, time.monotonic())
        body = parse_recommend_body(await request.body(), request.headers.get("content-type"))
        budget = self._check(body)
        # every wait below ends by the deadline, less the time kept for formatting and sending the answer
        deadline = arrival + (budget - self.cfg.ingress.reply_reserve_ms) / 1000
        history = body.history[-self.cfg.ingress.max_history_items:]
        timings: dict[str, float] = {}

        def answer(items: list[ItemOut], reranked: bool, fallback: str | None, explanation: str | None = None):
            timings["total"] = round(1000 * (time.monotonic() - arrival), 2)
            return RecommendResponse(items=items[: body.k], reranked=reranked, fallback=fallback,
                                     explanation=explanation if body.explain else None, history_used=len(history),
                                     budget_ms=budget, timings_ms=timings)

        if not history:
            return answer([self._item(i) for i in self.popular], False, "cold_start" if body.rerank else None)
        ranked = await self._rank(history, body.history, deadline, budget)
        if isinstance(ranked, JSONResponse):
            return ranked
        timings["ranker"] = round(1000 * (time.monotonic() - arrival), 2)
        score = {item: s for item, s in ranked}
        prerank = [item for item, _ in ranked]
        position = {item: n + 1 for n, item in enumerate(prerank)}

        def items_in(order: list[int]) -> list[ItemOut]:
            return [self._item(i, position[i], score[i]) for i in order]

        if not body.rerank:
            return answer(items_in(prerank), False, None)
        if self.reranker is None:
            return answer(items_in(prerank), False, "disabled")
        left = deadline - time.monotonic()
        if left <= 0:
            return answer(items_in(prerank), False, "budget_spent")
        rerank_start = time.monotonic()
        result = await self._rerank(history, prerank, left)
        timings["reranker"] = round(1000 * (time.monotonic() - rerank_start), 2)
        reason = result["reason"]
        if reason is None:
            return answer(items_in(result["ranking"]), True, None, result["explanation"])
        if reason not in ("timeout", "expired", "reranker_unavailable") and not reason.startswith("reranker_error"):
            reason = f"invalid_answer:{reason}"
        return answer(items_in(prerank), False, reason, result.get("explanation"))

    @api.get("/v1/items/{item_id}", response_model=ItemInfo)
    async def item(self, item_id: int) -> ItemInfo:
        if item_id not in self.sid_of:
            return JSONResponse({"detail": f"unknown item id {item_id}"}, status_code=404)
        return ItemInfo(item_id=item_id, title=self.title_of.get(item_id, ""), sid=self.sid_of[item_id])

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """The ingress answers; `*_available` is what it knows of the model deployments from its own calls."""
        return {"status": "ok", "ranker": self.cfg.ranker.model, "ranker_available": not self.ranker_health.down,
                "reranker": self.cfg.reranker.model if self.reranker is not None else None,
                "reranker_available": None if self.reranker_health is None else not self.reranker_health.down}


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
