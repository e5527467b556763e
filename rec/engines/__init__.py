"""vLLM engines behind the system's two models, one concern per module (vLLM is imported inside functions only):

- `rec.engines.vllm_runtime`: starting an engine (in or out of process, CPU core binding).
- `rec.engines.sid_ranker`: the **ranker** (pre-rank stage, serving Ranker): trie-constrained beam search over SIDs.
- `rec.engines.reranker`: the **re-ranker** (traces, evaluation, RL rollouts, serving ReRanker): prompt -> answer
  -> final ranking, with the ranking-constraint logits processor.
- `rec.engines.weight_sync`: new weights into a live engine (RL), files or NCCL.
"""

# Transitional: old `from rec.engines import X` imports resolve to the module that now holds X.
_MOVED = {
    "start_llm": "vllm_runtime", "claim_cpu_cores": "vllm_runtime",
    "VllmSidBeamSearch": "sid_ranker", "SidRanker": "sid_ranker", "MAX_LOGPROB_IDS": "sid_ranker",
    "RerankGenerator": "reranker", "Reranker": "reranker", "Reranked": "reranker", "PROMPT_TOO_LONG": "reranker",
    "RANKING_PROCESSOR": "reranker", "RANKING_ARGS": "reranker", "ranking_extra_args": "reranker",
    "RankingLogitsProcessor": "reranker",
    "WEIGHT_SYNC_EXTENSION": "weight_sync", "WeightSyncExtension": "weight_sync",
    "completion_logprobs": "weight_sync",
}


def __getattr__(name: str):
    import importlib

    if name in _MOVED:
        return getattr(importlib.import_module(f"{__name__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
