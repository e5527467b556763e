"""vLLM engines behind the system's two models, one concern per module (vLLM is imported inside functions only):

- `rec.engines.vllm_runtime`: starting an engine (in or out of process, CPU core binding).
- `rec.engines.sid_ranker`: the **ranker** (pre-rank stage, serving Ranker): trie-constrained beam search over SIDs.
- `rec.engines.reranker`: the **re-ranker** (traces, evaluation, RL rollouts, serving ReRanker): prompt -> answer
  -> final ranking, with the ranking-constraint logits processor; static batches on `vllm.LLM`.
- `rec.engines.async_reranker`: the same re-ranker on vLLM's async engine (serving ReRanker; traces and evaluation
  with `continuous: true`): one engine request per prompt, continuous batching, requests aborted at their deadline.
- `rec.engines.weight_sync`: new weights into a live engine (RL), files or NCCL.
"""

