"""The RL stage's rollout actors: one vLLM engine each (`RolloutWorker`), sampling and scoring answer groups,
re-ranking validation rows greedily, and taking new weights in place from the trainer (`pipelines/weight_sync.py`
drives them: files or NCCL). A plain class; `pipelines/rl.py` makes it a Ray actor.

Rollouts stay on the blocking `vllm.LLM` (not the async engine that traces, evaluate and serving use): a DAPO step
is on-policy, so every sample of an update must come from the weights of that step, and one `sample` call already
puts all of a generation batch's prompts x samples into the engine at once (`prompts_per_step` x
`samples_per_prompt` requests, as many as the engine takes). What continuous batching would add is overlap across
steps — sending the next step's rollouts before this step's update — which makes them off-policy by one step; not
done.
"""

from __future__ import annotations

import logging
from typing import Any

from rec.engines.weight_sync import FileWeightUpdateActor
from rec.io import RunDir
from rec.rerank import RerankPromptSection

log = logging.getLogger("gr2.rl")


class RolloutWorker(FileWeightUpdateActor):
    """A vLLM engine that samples and scores answer groups, re-ranks validation rows greedily, and takes new
    weights in place (files backend: the `FileWeightUpdateActor` methods; nccl: the methods below)."""

    def __init__(self, run_dir: str, model: str, prompt: dict, eos_token: str, cfg: dict[str, Any]):
        from pipelines.common import setup_logging, start_reranker
        from pipelines.rl import RlConfig
        from rec.engines.reranker import Reranker, RerankGenerator
        from rec.engines.weight_sync import WEIGHT_SYNC_EXTENSION, nccl_engine_args

        setup_logging()
        self.cfg = cfg = RlConfig.model_validate(cfg)
        r = cfg.rollout
        extra = nccl_engine_args() if r.weight_sync.backend == "nccl" else {}
        self.reranker, bound, self._core_lock = start_reranker(
            RunDir.open(run_dir), model, RerankPromptSection.model_validate(prompt), eos_token, cfg.sampling,
            r.engine, r.cpus_per_actor, r.gpus_per_actor, r.bind_cores, seed=cfg.seed,
            worker_extension_cls=WEIGHT_SYNC_EXTENSION, **extra)
        sampler = self.reranker.generator
        self.llm = sampler.llm
        greedy = cfg.sampling.model_copy(update={"temperature": 0.0})
        greedy_generator = RerankGenerator(sampler.tokenizer, sampler.eos_id, greedy, llm=self.llm, answer=sampler.answer,
                                           top=sampler.top)
        self.greedy = Reranker(self.reranker.prompts, greedy_generator, r.engine.max_model_len)
        log.info("rollout actor: %s on cores %s, engine %s", model, bound or "-",
                 "out of process" if self.out_of_process() else "in process")

    def out_of_process(self) -> bool:
        from rec.engines.vllm_runtime import out_of_process

        return out_of_process(self.llm)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def sample(self, rows: list[dict], samples: int) -> list[dict]:
        """Per row: {row_id, prompt_ids, samples: [{completion_ids, reward, rank_reward, valid, identity, length}]}.
        A row whose prompt does not fit the engine is skipped (counted by the caller)."""
        from rec.answer_constraint import RankingConstraint
        from rec.rerank import final_ranking, parse_answer
        from rec.rl import constrained_choices, score_sample

        cfg, prompts, generator = self.cfg, self.reranker.prompts, self.reranker.generator
        built = []
        for row in rows:
            # the prompt may list the candidates shuffled (prompt.shuffle_candidates); the answer names SIDs, so it is
            # constrained, parsed and scored against the pre-rank list row["candidates"] all the same
            _, prompt_ids = prompts.prompt(row["history"], row["candidates"])
            token_ids = prompts.candidate_token_ids(row["candidates"])
            if len(prompt_ids) + generator.max_tokens(token_ids) <= cfg.rollout.engine.max_model_len:
                built.append((row, prompt_ids, token_ids))
        answers = generator.generate([b[1] for b in built], [b[2] for b in built], [samples] * len(built),
                                     with_ids=True) if built else []
        groups = []
        for (row, prompt_ids, token_ids), group in zip(built, answers):
            scored = []
            for text, length, completion_ids in group:
                loss_mask, choices = [1] * len(completion_ids), {}
                if generator.format is not None:  # sampled under the ranking constraint: the policy's own choices
                    constraint = RankingConstraint(generator.format, token_ids, cfg.sampling.max_explanation_tokens)
                    loss_mask, choices = constrained_choices(constraint, completion_ids)
                parsed = parse_answer(text, prompts.candidate_sids(row["candidates"]), prompts.section.answer,
                                      prompts.section.answer_top)
                ranking, reason = final_ranking(parsed, row["candidates"])
                s = score_sample(ranking, reason is None, row["candidates"], row["target"], cfg.rl.reward,
                                 cfg.rl.alpha, length, generator.max_tokens([]) if not cfg.sampling.constrained
                                 else 0, cfg.rl.overlong_buffer, cfg.rl.overlong_factor)
                scored.append({"completion_ids": completion_ids, "loss_mask": loss_mask, "choices": choices,
                               "reward": s.reward, "rank_reward": s.rank_reward, "valid": s.valid,
                               "identity": s.identity, "length": length})
            groups.append({"row_id": row["row_id"], "prompt_ids": prompt_ids, "samples": scored})
        return groups

    def rerank(self, rows: list[dict]) -> list[list[int]]:
        """Greedy final rankings (the validation metrics)."""
        return [r.ranking for r in self.greedy.rerank([r["history"] for r in rows], [r["candidates"] for r in rows])]

    def logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        from rec.engines.weight_sync import completion_logprobs

        return completion_logprobs(self.llm, prompt_ids, completion_ids)

    # --- weights, backend `nccl`: vLLM's weight transfer API (RolloutFleetClient calls these) --------------------

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()
