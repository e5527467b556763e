"""The re-ranker (teacher traces, evaluation, RL rollouts, the serving ReRanker): history + candidates -> prompt
-> answer -> final ranking, on a vLLM engine or an HF model (the reference), optionally under the ranking constraint
(`rec.answer_constraint`, applied inside vLLM by `RankingLogitsProcessor`, a V1 logits processor loaded by its
qualified name `RANKING_PROCESSOR` in the engine process). vLLM is imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rec.rerank import JSON_ANSWER

RANKING_ARGS = "gr2_ranking"
RANKING_PROCESSOR = "rec.engines.reranker:RankingLogitsProcessor"
"""Pass to `start_llm(..., logits_processors=[RANKING_PROCESSOR])`; requests opt in with `ranking_extra_args`."""


def ranking_extra_args(candidate_token_ids: Sequence[Sequence[int]], max_explanation_tokens: int, eos_id: int,
                       first: int | None = None, answer: str = JSON_ANSWER, top: int | None = None) -> dict:
    """`SamplingParams(extra_args=...)` that constrains one request's answer to a ranking of these candidates
    (starting with candidate `first` when given), in the answer style `answer` (`RerankPromptSection.answer`), of
    `top` SID slots when given (`RerankPromptSection.answer_top`)."""
    return {RANKING_ARGS: {"candidates": [list(map(int, c)) for c in candidate_token_ids],
                           "max_explanation_tokens": int(max_explanation_tokens), "eos_id": int(eos_id),
                           "first": first, "answer": answer, "top": top}}


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
            self.tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
            self.base_formats: dict[str, RankingAnswerFormat] = {}
            self.formats: dict[tuple[int, str, int | None], RankingAnswerFormat] = {}

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
            eos, style, top = int(args["eos_id"]), args.get("answer", JSON_ANSWER), args.get("top")
            if (eos, style, top) not in self.formats:
                if style not in self.base_formats:
                    self.base_formats[style] = RankingAnswerFormat.from_tokenizer(self.tokenizer, style=style)
                self.formats[eos, style, top] = dataclasses.replace(self.base_formats[style], eos_id=eos, top=top)
            fmt = self.formats[eos, style, top]
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



class RerankDecoding:
    """How a re-rank answer is decoded, whichever engine writes it: its token budget, the ranking constraint's answer
    format, and the vLLM `SamplingParams` of one request (the sync and the async engine send the same). `answer` is
    the answer style (`RerankPromptSection.answer`), `top` how many candidates it ranks (`answer_top`)."""

    def __init__(self, tokenizer, eos_id: int, sampling, answer: str = JSON_ANSWER, top: int | None = None):
        from rec.answer_constraint import RankingAnswerFormat

        self.tokenizer, self.eos_id, self.sampling, self.answer, self.top = tokenizer, eos_id, sampling, answer, top
        self.format = (RankingAnswerFormat.from_tokenizer(tokenizer, eos_token=tokenizer.convert_ids_to_tokens(eos_id),
                                                          style=answer, top=top)
                       if sampling.constrained else None)

    def max_tokens(self, candidate_token_ids: Sequence[Sequence[int]]) -> int:
        s = self.sampling
        if self.format is not None:
            return self.format.max_tokens(candidate_token_ids, s.max_explanation_tokens)
        return s.max_tokens

    def sampling_params(self, candidate_token_ids: Sequence[Sequence[int]], n: int = 1, first: int | None = None,
                        **options: Any):
        """`n` answers to a prompt with these candidates (under the ranking constraint, starting with candidate
        `first` when given); `options` are further SamplingParams fields."""
        from vllm import SamplingParams

        s = self.sampling
        args: dict[str, Any] = {"n": n, "temperature": s.temperature, "top_p": s.top_p,
                                "max_tokens": self.max_tokens(candidate_token_ids), "stop_token_ids": [self.eos_id],
                                "skip_special_tokens": False, **options}
        if self.format is not None:
            args["extra_args"] = ranking_extra_args(candidate_token_ids, s.max_explanation_tokens, self.eos_id, first,
                                                    self.answer, self.top)
        return SamplingParams(**args)


def answers_of(output, with_ids: bool = False) -> list[tuple]:
    """A vLLM `RequestOutput`'s answers: (text, generated tokens including the eos[, token ids])."""
    return [(o.text, len(o.token_ids), list(o.token_ids)) if with_ids else (o.text, len(o.token_ids))
            for o in output.outputs]


class RerankGenerator(RerankDecoding):
    """Re-rank answers for prompts: one implementation for teacher traces, evaluation, RL rollouts and serving.

    Back-ends: a `vllm.LLM` (one request per prompt, its `n` samples share the prompt; the ranking constraint runs
    as the engine's logits processor, so start it with `logits_processors=[RANKING_PROCESSOR]`), or an HF causal LM
    (`generate` one prompt at a time, the same constraint as an HF logits processor: the reference). The async
    engine's counterpart is `rec.engines.async_reranker.AsyncReranker`.
    """

    def __init__(self, tokenizer, eos_id: int, sampling, llm=None, model=None, answer: str = JSON_ANSWER,
                 top: int | None = None):
        if (llm is None) == (model is None):
            raise ValueError("give exactly one of llm (vLLM) or model (HF)")
        super().__init__(tokenizer, eos_id, sampling, answer, top)
        self.llm, self.model = llm, model

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
        from vllm.inputs import TokensPrompt

        params = [self.sampling_params(c, n, f) for c, n, f in zip(candidate_token_ids, samples, first)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [answers_of(output, with_ids) for output in outputs]

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



PROMPT_TOO_LONG = "prompt_too_long"


@dataclass
class Reranked:
    """One re-ranked list: the final item order (the incoming one when `reason` says why the answer is unusable)."""

    ranking: list[int]
    reason: str | None
    generated_tokens: int
    completion: str | None
    explanation: str


class RerankLists:
    """What every re-ranker does around its engine: a list -> its prompt and candidate tokens (`PromptBuilder`), an
    answer -> the final ranking (`parse_answer` -> `final_ranking`). A prompt too long for the engine (prompt +
    answer budget over `max_model_len`) is not sent; it keeps the incoming order with the reason `prompt_too_long`.
    `decoding` is a `RerankDecoding` (or anything with its `max_tokens`)."""

    def __init__(self, prompts, decoding, max_model_len: int):
        self.prompts, self.decoding, self.max_model_len = prompts, decoding, max_model_len

    def request(self, history: Sequence[int], items: Sequence[int]) -> tuple[list[int], list[list[int]]] | None:
        """(prompt token ids, candidate token ids) of one list, or None when it does not fit the engine."""
        _, prompt_ids = self.prompts.prompt(history, items)
        token_ids = self.prompts.candidate_token_ids(items)
        if len(prompt_ids) + self.decoding.max_tokens(token_ids) > self.max_model_len:
            return None
        return prompt_ids, token_ids

    def result(self, items: Sequence[int], text: str, generated: int) -> Reranked:
        """The final ranking of `items` from an answer (the incoming order with the reason when it is unusable)."""
        from rec.rerank import final_ranking, parse_answer

        section = self.prompts.section
        parsed = parse_answer(text, self.prompts.candidate_sids(items), section.answer, section.answer_top)
        ranking, reason = final_ranking(parsed, items)
        return Reranked(ranking, reason, generated, text, parsed.explanation)

    @staticmethod
    def too_long(items: Sequence[int]) -> Reranked:
        return Reranked(list(items), PROMPT_TOO_LONG, 0, None, "")


class Reranker(RerankLists):
    """History + candidates -> final ranking: `RerankLists` around a `RerankGenerator`, one answer per list, lists
    sent in batches (evaluation, RL validation)."""

    def __init__(self, prompts, generator: RerankGenerator, max_model_len: int):
        super().__init__(prompts, generator, max_model_len)
        self.generator = generator

    def rerank(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> list[Reranked]:
        requests = [self.request(history, items) for history, items in zip(histories, candidates)]
        sent = [r for r in requests if r is not None]
        answers = iter(self.generator.generate([r[0] for r in sent], [r[1] for r in sent], [1] * len(sent))
                       if sent else [])
        out = []
        for request, items in zip(requests, candidates):
            if request is None:
                out.append(self.too_long(items))
                continue
            (text, generated), = next(answers)
            out.append(self.result(items, text, generated))
        return out
