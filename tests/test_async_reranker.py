"""The re-ranker on vLLM's async engine (rec.engines.async_reranker) for real: an AsyncLLM (its engine core in a child
process, as on GPUs) over the random tiny model of the prerank tests, with the ranking-constraint logits processor.

One engine serves the module, on an event loop of the module's own. Checked: constrained answers are the sync
engine's (same prompts, same constraint, same parse), a list that does not fit is not sent, and a request whose time
is up is aborted in the engine (its steps stop producing tokens for it) while another one runs to its end."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from beam_fixtures import make_prerank_run_dir

from pipelines.common import EngineSection, setup_env, start_async_reranker, start_reranker
from rec.engines.async_reranker import TIMEOUT, AsyncReranker
from rec.engines.reranker import PROMPT_TOO_LONG, RerankDecoding
from rec.rerank import RerankPromptSection, RerankSamplingSection

PROMPT = RerankPromptSection(history_token_budget=40, max_title_chars=16)
CONSTRAINED = RerankSamplingSection(temperature=0.0, constrained=True, max_explanation_tokens=8)
# long free-text answers: the random model never writes a ranking, and rarely an eos
LONG_MODEL_LEN = 4096


def _lists(run_dir, count: int) -> tuple[list[list[int]], list[list[int]]]:
    items = run_dir.read_parquet("sid", "sid_map.parquet").column("item_id").to_pylist()
    users = [h for h in run_dir.read_parquet("data", "train.parquet").column("item_ids").to_pylist() if len(h) >= 3]
    return [u[:3] for u in users[:count]], [items[10 * n: 10 * n + 10] for n in range(count)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """(loop, run_dir, AsyncReranker constrained, EngineLoad): the random tiny model with a 4096-position rotary range
    (so that an answer can take thousands of tokens), on one AsyncLLM."""
    setup_env()
    run_dir = make_prerank_run_dir(tmp_path_factory.mktemp("async") / "run", max_users=40)
    model = Path(run_dir.local_path("models", "long_answers"))
    shutil.copytree(run_dir.local_path("models", "midtrain"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": LONG_MODEL_LEN}))
    engine_section = EngineSection(max_model_len=LONG_MODEL_LEN, kv_cache_memory_bytes=64 * 2**20)
    reranker, _, lock = start_async_reranker(run_dir, str(model), PROMPT, "<|im_end|>", CONSTRAINED, engine_section,
                                             cpus=1, gpus=0, bind_cores=False)
    assert lock is None
    loop = asyncio.new_event_loop()  # the engine's output handler starts on the loop of its first request
    yield loop, run_dir, str(model), reranker
    reranker.shutdown()
    loop.close()


def _free_text(reranker: AsyncReranker, max_tokens: int) -> AsyncReranker:
    """Another re-ranker on the same engine: unconstrained, greedy, up to `max_tokens` tokens."""
    sampling = RerankSamplingSection(temperature=0.0, max_tokens=max_tokens)
    decoding = RerankDecoding(reranker.decoding.tokenizer, reranker.decoding.eos_id, sampling)
    return AsyncReranker(reranker.prompts, decoding, reranker.max_model_len, reranker.engine, reranker.load)


def test_constrained_answers_are_the_sync_engines(engine):
    loop, run_dir, model, reranker = engine
    histories, candidates = _lists(run_dir, 4)
    found = loop.run_until_complete(reranker.rerank_many(histories, candidates, timeout_s=60))
    sync, _, _ = start_reranker(run_dir, model, PROMPT, "<|im_end|>", CONSTRAINED,
                                EngineSection(max_model_len=LONG_MODEL_LEN, kv_cache_memory_bytes=64 * 2**20),
                                cpus=1, gpus=0, bind_cores=False)
    expected = sync.rerank(histories, candidates)
    assert [r.reason for r in found] == [None] * 4, found  # under the constraint every answer is a ranking
    assert [r.completion for r in found] == [r.completion for r in expected]
    assert [r.ranking for r in found] == [r.ranking for r in expected]
    assert all(sorted(r.ranking) == sorted(c) for r, c in zip(found, candidates))
    assert [r.generated_tokens for r in found] == [r.generated_tokens for r in expected]
    # a list whose prompt + answer budget exceeds the engine is not sent
    small = AsyncReranker(reranker.prompts, reranker.decoding, 64, reranker.engine, reranker.load)
    steps = reranker.load.steps
    (too_long,) = loop.run_until_complete(small.rerank_many(histories[:1], candidates[:1]))
    assert too_long.reason == PROMPT_TOO_LONG and too_long.ranking == candidates[0]
    assert reranker.load.steps == steps


def test_sids_answers_cross_to_the_engine_process_and_start_with_the_first_sid(engine):
    """prompt.answer=sids on the out-of-process engine (as on GPUs): the answer style travels in the request's
    extra_args to the logits processor in the engine core, which builds that style's constraint there: every answer is
    the ranked SIDs back to back, its first token the first SID's first token, then eos."""
    from rec.rerank import PromptBuilder

    loop, run_dir, _, reranker = engine
    histories, candidates = _lists(run_dir, 3)
    section = PROMPT.model_copy(update={"answer": "sids"})
    prompts = PromptBuilder(reranker.prompts.tokenizer, reranker.prompts.sid_of, reranker.prompts.title_of, section)
    decoding = RerankDecoding(reranker.decoding.tokenizer, reranker.decoding.eos_id, CONSTRAINED, "sids")
    sids = AsyncReranker(prompts, decoding, reranker.max_model_len, reranker.engine, reranker.load)
    found = loop.run_until_complete(sids.rerank_many(histories, candidates, timeout_s=60))
    for result, items in zip(found, candidates):
        assert result.reason is None and sorted(result.ranking) == sorted(items), result
        assert result.completion == "".join(prompts.sid_of[i] for i in result.ranking)
        assert result.generated_tokens == decoding.max_tokens(prompts.candidate_token_ids(items))
    # answer_top=1 crosses the same way: one SID slot in the engine's constraint, the rest kept in incoming order
    section = section.model_copy(update={"answer_top": 1})
    prompts = PromptBuilder(reranker.prompts.tokenizer, reranker.prompts.sid_of, reranker.prompts.title_of, section)
    decoding = RerankDecoding(reranker.decoding.tokenizer, reranker.decoding.eos_id, CONSTRAINED, "sids", 1)
    top = AsyncReranker(prompts, decoding, reranker.max_model_len, reranker.engine, reranker.load)
    for result, items in zip(loop.run_until_complete(top.rerank_many(histories, candidates, timeout_s=60)), candidates):
        first = result.ranking[0]
        assert result.reason is None and result.ranking == [first] + [i for i in items if i != first], result
        assert result.completion == prompts.sid_of[first]


def test_a_request_past_its_deadline_is_aborted_while_another_runs_on(engine):
    loop, run_dir, _, reranker = engine
    (short_history, long_history), (short_items, long_items) = _lists(run_dir, 2)
    endless, bounded = _free_text(reranker, 3000), _free_text(reranker, 1000)
    load = reranker.load

    async def scenario():
        finishing = asyncio.create_task(bounded.rerank(long_history, long_items))
        timed_out = await endless.rerank(short_history, short_items, timeout_s=0.5)
        at_timeout = dataclasses.replace(load)
        unfinished = reranker.engine.get_num_unfinished_requests()
        finished = await finishing
        return timed_out, at_timeout, unfinished, finished

    timed_out, at_timeout, unfinished, finished = loop.run_until_complete(scenario())
    assert timed_out.reason == TIMEOUT and timed_out.ranking == short_items and timed_out.completion is None
    assert unfinished == 1  # the aborted request is gone, the other one is still running
    assert finished.reason != TIMEOUT and finished.completion is not None
    assert at_timeout.generated_tokens > 0  # both were generating when the deadline passed
    steps, tokens = load.steps - at_timeout.steps, load.generated_tokens - at_timeout.generated_tokens
    # after the abort the engine stepped on for the other request alone: one token per step (an in-flight step may
    # still carry the aborted one's token); were the aborted request still running, each step would make two
    assert steps >= 50, (steps, finished.generated_tokens)
    assert tokens - steps <= 2, (tokens, steps)
    assert tokens <= finished.generated_tokens
    assert load.running == 0  # the engine's last step: nothing left running
