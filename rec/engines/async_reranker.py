"""The re-ranker on vLLM's async engine (`AsyncLLM`): each list is an engine request of its own, sent when it arrives.

The engine batches continuously: a request joins the running batch at the engine's next step and leaves it when its
answer ends, so a short answer is not held back by the longest one of a batch. A request whose time is up is aborted
(`AsyncLLM.generate` aborts the request in the engine when its consumer is cancelled): the engine stops generating
for it at once, and the list keeps its incoming order with the reason `timeout`. Prompts, token budgets, sampling
parameters, the ranking constraint and the parsing are the sync re-ranker's (`rec.engines.reranker`), so an answer
is the same whichever engine wrote it.

The engine core of an `AsyncLLM` always runs in a child process (vLLM's multi-process engine, on CPU too): every
argument crosses msgpack, the logits processor is loaded there by its qualified name, and the environment is read
there, so it is set before the engine starts (`start_async_llm`). vLLM is imported inside functions only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rec.engines.reranker import Reranked, RerankLists, answers_of

TIMEOUT = "timeout"
"""`Reranked.reason` of a list whose answer was not written within its time (the request was aborted)."""


@dataclass
class EngineLoad:
    """What the engine reported at its latest step (scheduler stats) and over its life (iteration stats)."""

    running: int = 0
    """Requests in the running batch."""
    waiting: int = 0
    """Requests queued for a place in it (more than max_num_seqs, or no KV cache left)."""
    steps: int = 0
    """Engine steps that produced tokens."""
    generated_tokens: int = 0
    """Tokens generated, all requests together."""

    def stat_logger(self):
        """A stat-logger factory for `AsyncLLM(stat_loggers=[...])` whose loggers keep this load up to date (built
        on first use: it subclasses vLLM's)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        load = self

        class EngineLoadLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    load.running, load.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
                if iteration_stats is not None and iteration_stats.num_generation_tokens:
                    load.steps += 1
                    load.generated_tokens += iteration_stats.num_generation_tokens

            def log_engine_initialized(self) -> None:
                pass

        return EngineLoadLogger


def start_async_llm(model: str, max_model_len: int, kv_cache_memory_bytes: int | None = None, dtype: str = "float32",
                    cpu_cores: str | None = None, stat_loggers: list | None = None, **engine_args: Any):
    """A `vllm.v1.engine.async_llm.AsyncLLM` for `model`, from the arguments `rec.engines.vllm_runtime.start_llm`
    takes (what `pipelines.common.engine_start_args` builds from an engine section) and with the same environment:
    `cpu_cores` binds the engine's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND, inherited by the engine's processes:
    on CPU vLLM runs the model in a worker process of the engine core, its multi-process executor, which is where
    vLLM 0.32 applies the binding), custom logits processors run on Model Runner V1, the prefix cache is on and the
    engine eager by default; there is no in-process choice (the engine core is always a child process). The engine's
    output handler runs on the event loop that is running when it starts, else on the loop of its first request."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from rec.engines.vllm_runtime import engine_setup

    engine_args = engine_setup(engine_args, kv_cache_memory_bytes, cpu_cores, in_process=False)
    # vLLM's periodic stat log off; stat_loggers (e.g. an EngineLoad's) still get every step's stats
    engine_args.setdefault("disable_log_stats", True)
    args = AsyncEngineArgs(model=model, dtype=dtype, max_model_len=max_model_len, **engine_args)
    return AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers)


class AsyncReranker(RerankLists):
    """History + candidates -> final ranking on an `AsyncLLM`, one engine request per list, with a time limit.

    `engine` is an AsyncLLM started with `logits_processors=[RANKING_PROCESSOR]` when `decoding` is constrained, and
    with `stat_loggers=[load.stat_logger()]` for `load` to follow the engine. Coroutines run on the
    engine's event loop; any number of them at once (the engine batches them)."""

    def __init__(self, prompts, decoding, max_model_len: int, engine, load: EngineLoad | None = None):
        super().__init__(prompts, decoding, max_model_len)
        self.engine, self.load = engine, load

    async def generate(self, prompt_ids: Sequence[int], candidate_token_ids: Sequence[Sequence[int]], n: int = 1,
                       first: int | None = None, timeout_s: float | None = None, with_ids: bool = False) -> list[tuple]:
        """`n` answers to one prompt, as `RerankGenerator.generate` gives them for a prompt: (text without the eos,
        generated tokens including it[, token ids]). TimeoutError after `timeout_s` seconds (None: no limit), when the
        request has been aborted in the engine."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = self.decoding.sampling_params(candidate_token_ids, n, first, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        # cancelled at the timeout (or by the caller): AsyncLLM.generate then aborts the request in the engine
        async with asyncio.timeout(timeout_s):
            async for output in self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params,
                                                     f"rerank-{uuid.uuid4().hex}"):
                final = output
        return answers_of(final, with_ids)

    async def rerank(self, history: Sequence[int], items: Sequence[int], timeout_s: float | None = None) -> Reranked:
        """The final ranking of `items` for `history`; the incoming order with reason `timeout` when the answer is not
        written within `timeout_s` seconds (its request aborted: the engine stops generating for it; generated_tokens
        0, as the engine sends final answers only), or `prompt_too_long` (not sent)."""
        request = self.request(history, items)
        if request is None:
            return self.too_long(items)
        try:
            (text, generated), = await self.generate(*request, timeout_s=timeout_s)
        except TimeoutError:
            return Reranked(list(items), TIMEOUT, 0, None, "")
        return self.result(items, text, generated)

    async def rerank_many(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                          timeout_s: float | None = None) -> list[Reranked]:
        """`rerank` for many lists at once (all in the engine together), in order."""
        return list(await asyncio.gather(*(self.rerank(h, c, timeout_s) for h, c in zip(histories, candidates))))

    async def check_health(self) -> None:
        """Raises the engine's error when its engine process died."""
        await self.engine.check_health()

    def shutdown(self) -> None:
        """Stop the engine process."""
        self.engine.shutdown()
