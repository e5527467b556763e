"""vLLM back-end of the SID beam search: a beam over the trie levels driven from Python, one engine call per level.

`rec.beam.hf_beam_search` is the reference; `VllmSidBeamSearch.search` returns the same top-N for the same
checkpoint. Each level sends one request per live beam: the prompt plus the beam's codes so far, `max_tokens=1`,
and `logprob_token_ids` = the codes the trie allows next (vLLM returns the raw log-probabilities of exactly those
tokens, normalised over the full vocabulary as HF's beam scores are). The prompt is shared by all beams of a user,
so vLLM's prefix cache computes it once. The best `num_beams` (beam, code) pairs of each prompt survive.

Why not the alternatives DESIGN.md lists: `LLM.beam_search` cannot see custom logits processors, and a V1 logits
processor only masks tokens inside vLLM's own sampling loop, which has no beam search; the beam still has to be
driven from here, so one `generate` per level with `logprob_token_ids` is the direct route.

vLLM is imported inside functions only (rec/ stays importable without it). Start engines with `start_llm`, which
sets the CPU thread binding before vLLM reads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rec.beam import SidDecoding, check_beam_args

# vLLM rejects longer `logprob_token_ids` lists (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS); wider trie nodes
# (up to codebook_size children) are split over several requests that share the prompt, hence the prefix cache.
MAX_LOGPROB_IDS = 128


def start_llm(
    model: str,
    max_model_len: int,
    kv_cache_memory_bytes: int | None = None,
    dtype: str = "float32",
    cpu_cores: str | None = None,
    in_process: bool = True,
    **engine_args: Any,
):
    """A `vllm.LLM` for `model` (a local HF checkpoint or hub id).

    `cpu_cores` (e.g. "0", "2-3" or "0,2") binds vLLM's OpenMP threads on CPU builds (VLLM_CPU_OMP_THREADS_BIND; vLLM binds
    every engine to core 0 otherwise); `in_process` runs the engine core in this process (no engine subprocess:
    ~2 s start instead of ~20 s on CPU). Both are environment settings vLLM reads when the engine starts.
    """
    if cpu_cores is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
    if engine_args.get("logits_processors"):
        # Custom processors here use the V1 interface (`vllm.v1.sample.logits_processor`); GPU builds default to
        # Model Runner V2, which has its own. The CPU runner is V1 either way.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        engine_args.setdefault("distributed_executor_backend", "uni")
    from vllm import LLM

    if kv_cache_memory_bytes is not None:
        engine_args["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    engine_args.setdefault("enforce_eager", True)
    engine_args.setdefault("enable_prefix_caching", True)
    return LLM(model=model, dtype=dtype, max_model_len=max_model_len, **engine_args)


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
        for level in range(decoding.levels):
            token_row = token_ids[level]
            requests, owners = [], []
            for row, prompt in enumerate(prompts):
                for beam_index, (codes, node, _) in enumerate(beams[row]):
                    child_codes, child_nodes = decoding.children_of(node, level, excluded[row])
                    prefix = prompt + token_ids[np.arange(level), list(codes)].tolist()
                    for start in range(0, len(child_codes), MAX_LOGPROB_IDS):
                        chunk = slice(start, start + MAX_LOGPROB_IDS)
                        requests.append((prefix, token_row[child_codes[chunk]]))
                        owners.append((row, beam_index, child_codes[chunk], child_nodes[chunk]))
            scored = self._score(requests) if requests else []
            candidates: list[list[tuple[float, tuple[int, ...], int]]] = [[] for _ in prompts]
            for (row, beam_index, child_codes, child_nodes), logprobs in zip(owners, scored):
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


def claim_cpu_cores(count: int, lock_dir: str | None = None) -> tuple[str, Any] | None:
    """Reserve `count` cores of this node for one engine: (VLLM_CPU_OMP_THREADS_BIND value, lock to keep open).

    Engines on one node (e.g. the actors of a Ray Data pool, which are not numbered) take consecutive blocks of the
    cores this process may run on, first come first served, through exclusive file locks that the OS releases when
    the process exits. Returns None when every block is taken (more engines than cores: leave the binding to vLLM).
    """
    import fcntl
    import tempfile

    cores = sorted(os.sched_getaffinity(0))
    directory = lock_dir or os.path.join(tempfile.gettempdir(), "gr2-vllm-cores")
    os.makedirs(directory, exist_ok=True)
    for start in range(0, len(cores) - count + 1, count):
        block = cores[start : start + count]
        handle = open(os.path.join(directory, f"cores-{block[0]}-{block[-1]}.lock"), "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return ",".join(map(str, block)), handle
    return None


RANKING_ARGS = "gr2_ranking"
RANKING_PROCESSOR = "rec.engines:RankingLogitsProcessor"
"""Pass to `start_llm(..., logits_processors=[RANKING_PROCESSOR])`; requests opt in with `ranking_extra_args`."""


def ranking_extra_args(candidate_token_ids: Sequence[Sequence[int]], max_explanation_tokens: int, eos_id: int,
                       first: int | None = None) -> dict:
    """`SamplingParams(extra_args=...)` that constrains one request's answer to a ranking of these candidates
    (starting with candidate `first` when given)."""
    return {RANKING_ARGS: {"candidates": [list(map(int, c)) for c in candidate_token_ids],
                           "max_explanation_tokens": int(max_explanation_tokens), "eos_id": int(eos_id),
                           "first": first}}


def _ranking_logits_processor_class():
    """vLLM's per-request adapter around `rec.answer_constraint.RankingConstraint` (built on first use, so that
    importing rec.engines does not import vLLM)."""
    import dataclasses

    from transformers import AutoTokenizer
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    from rec.answer_constraint import RankingAnswerFormat, RankingConstraint

    class RankingLogitsProcessor(AdapterLogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            super().__init__(vllm_config, device, is_pin_memory)
            tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
            self.base_format = RankingAnswerFormat.from_tokenizer(tokenizer)
            self.formats: dict[int, RankingAnswerFormat] = {}

        @classmethod
        def validate_params(cls, params) -> None:
            args = (params.extra_args or {}).get(RANKING_ARGS)
            if args is not None and not args.get("candidates"):
                raise ValueError(f"extra_args[{RANKING_ARGS!r}] needs a non-empty 'candidates' list")

        def is_argmax_invariant(self) -> bool:
            return False  # it changes which token is most likely

        def new_req_logits_processor(self, params):
            args = (params.extra_args or {}).get(RANKING_ARGS)
            if args is None:
                return None
            eos = int(args["eos_id"])
            fmt = self.formats.setdefault(eos, dataclasses.replace(self.base_format, eos_id=eos))
            constraint = RankingConstraint(fmt, args["candidates"], int(args["max_explanation_tokens"]),
                                           first=args.get("first"))
            return constraint.apply

    RankingLogitsProcessor.__module__ = __name__
    return RankingLogitsProcessor


def __getattr__(name: str):
    if name == "RankingLogitsProcessor":
        cls = _ranking_logits_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


WEIGHT_SYNC_EXTENSION = "rec.engines.WeightSyncExtension"
"""Pass as `start_llm(..., worker_extension_cls=WEIGHT_SYNC_EXTENSION)` to update an engine's weights in place."""


class WeightSyncExtension:
    """vLLM worker extension: new weights into a live engine (RL), without restarting it.

    Called as `llm.collective_rpc("load_weights_from_bytes", args=(blob,))` with the weights as safetensors bytes
    (raw tensors do not survive vLLM's multi-process path); follow with `llm.reset_prefix_cache()`, or cached
    prefixes keep serving KV computed with the old weights. vLLM mixes this class into its worker class.
    """

    def load_weights_from_bytes(self, blob: bytes) -> int:
        from safetensors.torch import load

        weights = load(blob)
        self.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)


def push_weights(llm, blob: bytes) -> None:
    """Load safetensors bytes into a live engine started with `WEIGHT_SYNC_EXTENSION`, then drop cached prefixes."""
    llm.collective_rpc("load_weights_from_bytes", args=(blob,))
    llm.reset_prefix_cache()


def completion_logprobs(llm, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
    """The engine's log-probability of each completion token after the prompt (prompt log-probs of the joined
    sequence, raw logits): what the trainer's model must reproduce once the weights are synced."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = list(prompt_ids) + list(completion_ids)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    output = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    return [output.prompt_logprobs[i][ids[i]].logprob for i in range(len(prompt_ids), len(ids))]


class RerankGenerator:
    """Re-rank answers for prompts: one implementation for teacher traces, evaluation, RL rollouts and serving.

    Back-ends: a `vllm.LLM` (one request per prompt, its `n` samples share the prompt; the ranking constraint runs
    as the engine's logits processor, so start it with `logits_processors=[RANKING_PROCESSOR]`), or an HF causal LM
    (`generate` one prompt at a time, the same constraint as an HF logits processor: the reference).
    """

    def __init__(self, tokenizer, eos_id: int, sampling, llm=None, model=None):
        from rec.answer_constraint import RankingAnswerFormat

        if (llm is None) == (model is None):
            raise ValueError("give exactly one of llm (vLLM) or model (HF)")
        self.tokenizer, self.eos_id, self.sampling, self.llm, self.model = tokenizer, eos_id, sampling, llm, model
        self.format = (RankingAnswerFormat.from_tokenizer(tokenizer, eos_token=tokenizer.convert_ids_to_tokens(eos_id))
                       if sampling.constrained else None)

    def max_tokens(self, candidate_token_ids: Sequence[Sequence[int]]) -> int:
        s = self.sampling
        if self.format is not None:
            return self.format.max_tokens(candidate_token_ids, s.max_explanation_tokens)
        return s.max_tokens

    def generate(
        self, prompts: Sequence[Sequence[int]], candidate_token_ids: Sequence[Sequence[Sequence[int]]],
        samples: Sequence[int], first: Sequence[int | None] | None = None, with_ids: bool = False,
    ) -> list[list[tuple]]:
        """`samples[i]` answers to prompt i as (text without the eos, generated tokens including it), plus the
        generated token ids when `with_ids` (what RL trains on). With the ranking constraint, `first[i]` pins the
        candidate a ranking must start with."""
        first = list(first) if first is not None else [None] * len(prompts)
        if self.model is not None:
            answers = [self._hf(p, c, n, f) for p, c, n, f in zip(prompts, candidate_token_ids, samples, first)]
            return answers if with_ids else [[a[:2] for a in row] for row in answers]
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.sampling
        params = []
        for candidates, n, pinned in zip(candidate_token_ids, samples, first):
            args: dict[str, Any] = {"n": n, "temperature": s.temperature, "top_p": s.top_p,
                                    "max_tokens": self.max_tokens(candidates), "stop_token_ids": [self.eos_id],
                                    "skip_special_tokens": False}
            if self.format is not None:
                args["extra_args"] = ranking_extra_args(candidates, s.max_explanation_tokens, self.eos_id, pinned)
            params.append(SamplingParams(**args))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [[(o.text, len(o.token_ids), list(o.token_ids)) if with_ids else (o.text, len(o.token_ids))
                 for o in output.outputs] for output in outputs]

    def _hf(self, prompt_ids: Sequence[int], candidates: Sequence[Sequence[int]], n: int,
            first: int | None = None) -> list[tuple[str, int, list[int]]]:
        import torch

        from rec.answer_constraint import HfRankingLogitsProcessor, RankingConstraint

        s = self.sampling
        prompt = torch.tensor([list(prompt_ids)], device=self.model.device)
        processors = []
        if self.format is not None:
            constraints = [RankingConstraint(self.format, candidates, s.max_explanation_tokens, first=first)
                           for _ in range(n)]
            processors.append(HfRankingLogitsProcessor(constraints, prompt.shape[1]))
        sample = s.temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=sample,
                temperature=s.temperature if sample else None, top_p=s.top_p if sample else None,
                top_k=0 if sample else None, num_return_sequences=n, max_new_tokens=self.max_tokens(candidates),
                logits_processor=processors, eos_token_id=self.eos_id, pad_token_id=self.tokenizer.pad_token_id,
            )
        answers = []
        for tokens in out[:, prompt.shape[1]:].tolist():
            if self.eos_id in tokens:
                tokens = tokens[: tokens.index(self.eos_id) + 1]
            text = self.tokenizer.decode([t for t in tokens if t != self.eos_id], skip_special_tokens=False)
            answers.append((text, len(tokens), tokens))
        return answers


class SidRanker:
    """Histories -> top-N catalogue items by trie-constrained beam search: the prerank stage and the serving Ranker.

    Back-ends: a `vllm.LLM` (`VllmSidBeamSearch`) or an HF causal LM (`rec.beam.hf_beam_search`, the reference).
    Histories longer than the engine's `max_model_len` keep their most recent items.
    """

    def __init__(self, tokenizer, item_ids: Sequence[int], codes: np.ndarray, codebook_size: int, num_beams: int,
                 top_n: int, max_model_len: int, llm=None, model=None):
        from rec.midtrain_data import SidEncoder

        if (llm is None) == (model is None):
            raise ValueError("give exactly one of llm (vLLM) or model (HF)")
        check_beam_args(num_beams, top_n)
        codes = np.asarray(codes, dtype=np.int64)
        self.encoder = SidEncoder(tokenizer, item_ids, codes, codebook_size)
        self.decoding = SidDecoding.from_sid_map(tokenizer, item_ids, codes, codebook_size)
        self.num_beams, self.top_n, self.max_model_len = num_beams, top_n, max_model_len
        self.pad_id, self.model = tokenizer.pad_token_id, model
        self.search = VllmSidBeamSearch(llm, self.decoding, num_beams, top_n) if llm is not None else None

    def rank(self, histories: Sequence[Sequence[int]], exclude_history: bool = True) -> list[list[tuple[int, float]]]:
        """Per history, up to `top_n` distinct (item_id, score), best first; with `exclude_history` no history item
        is proposed."""
        from rec.beam import hf_beam_search
        from rec.midtrain_data import next_item_prompt_ids

        prompts = [next_item_prompt_ids(self.encoder, h, self.max_model_len) for h in histories]
        exclude = [list(h) for h in histories] if exclude_history else None
        if self.model is not None:
            return hf_beam_search(self.model, self.decoding, prompts, self.num_beams, self.top_n, exclude=exclude,
                                  pad_id=self.pad_id)
        return self.search.search(prompts, exclude)


PROMPT_TOO_LONG = "prompt_too_long"


@dataclass
class Reranked:
    """One re-ranked list: the final item order (the incoming one when `reason` says why the answer is unusable)."""

    ranking: list[int]
    reason: str | None
    generated_tokens: int
    completion: str | None
    explanation: str


class Reranker:
    """History + candidates -> final ranking: `PromptBuilder` -> `RerankGenerator` -> `parse_answer` ->
    `final_ranking`, one answer per list (evaluation and the serving ReRanker). A prompt too long for the engine is
    not sent; it keeps the incoming order with the reason `prompt_too_long`."""

    def __init__(self, prompts, generator: RerankGenerator, max_model_len: int):
        self.prompts, self.generator, self.max_model_len = prompts, generator, max_model_len

    def rerank(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> list[Reranked]:
        from rec.rerank import final_ranking, parse_answer

        rows = []
        for history, items in zip(histories, candidates):
            _, prompt_ids = self.prompts.prompt(history, items)
            token_ids = self.prompts.candidate_token_ids(items)
            rows.append((prompt_ids, token_ids,
                         len(prompt_ids) + self.generator.max_tokens(token_ids) <= self.max_model_len))
        sent = [r for r in rows if r[2]]
        answers = iter(self.generator.generate([r[0] for r in sent], [r[1] for r in sent], [1] * len(sent))
                       if sent else [])
        out = []
        for (_, _, fits), items in zip(rows, candidates):
            if not fits:
                out.append(Reranked(list(items), PROMPT_TOO_LONG, 0, None, ""))
                continue
            (text, generated), = next(answers)
            parsed = parse_answer(text, self.prompts.candidate_sids(items))
            ranking, reason = final_ranking(parsed, items)
            out.append(Reranked(ranking, reason, generated, text, parsed.explanation))
        return out
