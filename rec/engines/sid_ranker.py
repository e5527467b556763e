"""The SID ranker (pre-ranking, the serving Ranker): histories -> top-N catalogue items by trie-constrained beam
search, on a vLLM engine (`VllmSidBeamSearch`) or an HF model (`rec.beam.hf_beam_search`, the reference).

`rec.beam.hf_beam_search` is the reference; `VllmSidBeamSearch.search` returns the same top-N for the same
checkpoint. Each level sends one request per live beam: the prompt plus the beam's codes so far, `max_tokens=1`,
and `logprob_token_ids` = the codes the trie allows next (vLLM returns the raw log-probabilities of exactly those
tokens, normalised over the full vocabulary as HF's beam scores are; for a `sid_softmax: level` model every code of
the level is scored and the allowed ones renormalised over them, as `rec.beam` does). The prompt is shared by all
beams of a user, so vLLM's prefix cache computes it once. The best `num_beams` (beam, code) pairs of each prompt
survive.

Why not the alternatives: `LLM.beam_search` cannot see custom logits processors, and a V1 logits
processor only masks tokens inside vLLM's own sampling loop, which has no beam search; the beam still has to be
driven from here, so one `generate` per level with `logprob_token_ids` is the direct route.

vLLM is imported inside functions only (rec/ stays importable without it). Start engines with
`rec.engines.vllm_runtime.start_llm`, which sets the CPU thread binding before vLLM reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rec.beam import SidDecoding, check_beam_args

# vLLM rejects longer `logprob_token_ids` lists (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS); wider trie nodes
# (up to codebook_size children) are split over several requests that share the prompt, hence the prefix cache.
MAX_LOGPROB_IDS = 128


class VllmSidBeamSearch:
    """Trie-constrained beam search over a `vllm.LLM`: the API and answers of `rec.beam.hf_beam_search`."""

    def __init__(self, llm, decoding: SidDecoding, num_beams: int, top_n: int):
        check_beam_args(num_beams, top_n)
        self.llm = llm
        self.decoding = decoding
        self.num_beams = num_beams
        self.top_n = top_n

    def _score(self, requests: list[tuple[list[int], np.ndarray]]) -> list[np.ndarray]:
        """Raw log-probabilities of the given next tokens after each prompt (one engine call for all)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for prompt, token_ids in requests:
            prompts.append(TokensPrompt(prompt_token_ids=prompt))
            params.append(
                SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=token_ids.tolist(), detokenize=False)
            )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        scores = []
        for (_, token_ids), output in zip(requests, outputs):
            by_token = output.outputs[0].logprobs[0]
            scores.append(np.array([by_token[int(t)].logprob for t in token_ids], dtype=np.float64))
        return scores

    def search(
        self, prompts: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]] | None = None
    ) -> list[list[tuple[int, float]]]:
        """Per prompt, up to `top_n` distinct (item_id, score), best first; `exclude[i]` items are never returned."""
        if exclude is not None and len(exclude) != len(prompts):
            raise ValueError(f"exclude has {len(exclude)} rows for {len(prompts)} prompts")
        decoding = self.decoding
        token_ids = decoding.code_token_ids.numpy()
        prompts = [decoding.prompt_ids(p) for p in prompts]
        excluded = [set(map(int, items)) for items in exclude] if exclude is not None else [set()] * len(prompts)
        # per prompt: the live beams as (codes so far, node, score)
        beams: list[list[tuple[tuple[int, ...], int, float]]] = [[((), 0, 0.0)] for _ in prompts]
        level_softmax = decoding.sid_softmax == "level"
        all_codes = np.arange(decoding.codebook_size)
        for level in range(decoding.levels):
            token_row = token_ids[level]
            requests, owners = [], []
            for row, prompt in enumerate(prompts):
                for beam_index, (codes, node, _) in enumerate(beams[row]):
                    child_codes, child_nodes = decoding.children_of(node, level, excluded[row])
                    if not len(child_codes):
                        continue
                    prefix = prompt + token_ids[np.arange(level), list(codes)].tolist()
                    # a `level` model's codes are normalised over the whole level: all of its codes are scored
                    wanted = all_codes if level_softmax else child_codes
                    chunks = range(0, len(wanted), MAX_LOGPROB_IDS)
                    for start in chunks:
                        requests.append((prefix, token_row[wanted[start:start + MAX_LOGPROB_IDS]]))
                    owners.append((row, beam_index, child_codes, child_nodes, len(chunks)))
            scored = iter(self._score(requests) if requests else [])
            candidates: list[list[tuple[float, tuple[int, ...], int]]] = [[] for _ in prompts]
            for row, beam_index, child_codes, child_nodes, chunks in owners:
                logprobs = np.concatenate([next(scored) for _ in range(chunks)])
                if level_softmax:
                    peak = logprobs.max()
                    logprobs = (logprobs - peak - np.log(np.exp(logprobs - peak).sum()))[child_codes]
                codes, _, score = beams[row][beam_index]
                for code, node, logprob in zip(child_codes.tolist(), child_nodes.tolist(), logprobs.tolist()):
                    candidates[row].append((score + logprob, (*codes, code), node))
            # stable sort: ties keep beam order, then code order (as a top-k over [beam, vocab] tends to)
            beams = [
                [(codes, node, score) for score, codes, node in sorted(row, key=lambda c: -c[0])[: self.num_beams]]
                for row in candidates
            ]
        leaf_items = decoding.trie.leaf_item_ids.numpy()
        results = []
        for row in beams:
            results.append(
                [(int(leaf_items[node - decoding.trie.num_internal]), float(score)) for _, node, score in row][: self.top_n]
            )
        return results



class SidRanker:
    """Histories -> top-N catalogue items by trie-constrained beam search: the prerank stage and the serving Ranker.

    Back-ends: a `vllm.LLM` (`VllmSidBeamSearch`), or a torch causal LM searched by `rec.beam_torch.torch_beam_search`
    (`model_search="torch"`: one prefill per prompt, one batched forward per SID level) or by
    `rec.beam.hf_beam_search` (`"hf"`, the reference). Histories longer than the engine's `max_model_len` keep their
    most recent items. Scores are normalised as the model was trained (`sid_softmax`, `rec.beam`).
    """

    def __init__(self, tokenizer, item_ids: Sequence[int], codes: np.ndarray, codebook_size: int, num_beams: int,
                 top_n: int, max_model_len: int, llm=None, model=None, model_search: str = "torch",
                 threads: int | None = None, sid_softmax: str | None = None):
        from rec.midtrain_data import SidEncoder

        if (llm is None) == (model is None):
            raise ValueError("give exactly one of llm (vLLM) or model (torch / HF)")
        if model_search not in ("torch", "hf"):
            raise ValueError(f"model_search must be 'torch' or 'hf', not {model_search!r}")
        # torch's intra-op thread count is kept per calling thread under OpenMP: Ray Data and Serve call `rank` from
        # threads other than the one that built this object, which would otherwise run with every core's threads
        self.model_search, self.threads = model_search, threads
        check_beam_args(num_beams, top_n)
        codes = np.asarray(codes, dtype=np.int64)
        self.encoder = SidEncoder(tokenizer, item_ids, codes, codebook_size)
        if sid_softmax is None:  # the model's own (config.json); an engine's caller reads it (start_sid_ranker)
            if model is None:
                raise ValueError("give sid_softmax with a vLLM engine: the model's config.json value "
                                 "(rec.model.sid_softmax_of)")
            from rec.model import sid_softmax_of

            sid_softmax = sid_softmax_of(model.config)
        self.decoding = SidDecoding.from_sid_map(tokenizer, item_ids, codes, codebook_size, sid_softmax)
        self.num_beams, self.top_n, self.max_model_len = num_beams, top_n, max_model_len
        self.pad_id, self.model = tokenizer.pad_token_id, model
        self.search = VllmSidBeamSearch(llm, self.decoding, num_beams, top_n) if llm is not None else None

    def rank(self, histories: Sequence[Sequence[int]], exclude_history: bool = True,
             exclude: Sequence[Sequence[int]] | None = None) -> list[list[tuple[int, float]]]:
        """Per history, up to `top_n` distinct (item_id, score), best first; with `exclude_history` no history item
        is proposed. `exclude[i]`, when given, replaces history i as the items never proposed (the serving Ranker
        passes the user's whole history there while the prompt keeps only its most recent part)."""
        from rec.beam import hf_beam_search
        from rec.midtrain_data import next_item_prompt_ids

        if exclude is not None and len(exclude) != len(histories):
            raise ValueError(f"exclude has {len(exclude)} rows for {len(histories)} histories")
        prompts = [next_item_prompt_ids(self.encoder, h, self.max_model_len) for h in histories]
        if exclude is not None:
            exclude = [list(items) for items in exclude]
        elif exclude_history:
            exclude = [list(h) for h in histories]
        if self.model is not None:
            import torch

            from rec.beam_torch import torch_beam_search

            if self.threads is not None and torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)

            search = torch_beam_search if self.model_search == "torch" else hf_beam_search
            return search(self.model, self.decoding, prompts, self.num_beams, self.top_n, exclude=exclude,
                          pad_id=self.pad_id)
        return self.search.search(prompts, exclude)

