"""Constrained answers: decoding that can only produce a well-formed ranking of the given candidates.

The answer is forced into the shape `rec.rerank.parse_answer` reads,

    {"explanation": "<free text>", "recommendations": ["<SID>", "<SID>", ...]}<eos>

where the explanation is free text from JSON-safe tokens (no quote, backslash, control character or chat marker;
SID tokens allowed) ended by the model choosing the `"` token or by the `max_explanation_tokens` budget, and every
`<SID>` slot is a walk down the token trie of the candidates not yet ranked, so the result is always a
permutation. The sampling distribution inside each allowed set is the model's own: a constrained teacher still
chooses which candidate comes first.

With `answer: sids` (`RerankPromptSection.answer`) the answer is the ranking alone, the SIDs back to back as
mid-training wrote a user's sequence, then eos: the first answer token is the first SID's first token, with nothing
between the prompt and it.

`RankingConstraint` is the per-sequence state machine (pure torch); `HfRankingLogitsProcessor` applies it in
HF `generate` (the reference); `rec.engines.reranker.RankingLogitsProcessor` applies it inside vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rec.rerank import ANSWER_STYLES, JSON_ANSWER, SIDS_ANSWER
from rec.sid.codes import SID_BEGIN, SID_END

OPEN = '{"explanation": "'
MIDDLE = ', "recommendations": ["'
SEPARATOR = '", "'
CLOSE = '"]}'


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@dataclass(frozen=True)
class RankingAnswerFormat:
    """Token ids of the fixed parts of the answer for one tokenizer, and the explanation's allowed tokens."""

    open_ids: tuple[int, ...]
    quote_id: int
    middle_ids: tuple[int, ...]
    separator_ids: tuple[int, ...]
    close_ids: tuple[int, ...]
    eos_id: int
    text_mask: torch.Tensor
    """[vocab] bool: tokens allowed inside the explanation string, and the `"` that closes it."""
    explanation: bool = True
    """False for the `sids` style: no explanation, no fixed text; the SID slots, then eos."""
    top: int | None = None
    """SID slots of an answer (`RerankPromptSection.answer_top`); None: one per candidate."""

    @classmethod
    def from_tokenizer(cls, tokenizer, eos_token: str | None = None, style: str = JSON_ANSWER, top: int | None = None
                       ) -> RankingAnswerFormat:
        if style not in ANSWER_STYLES:
            raise ValueError(f"unknown answer style {style!r}; known: {', '.join(ANSWER_STYLES)}")
        eos = tokenizer.convert_tokens_to_ids(eos_token) if eos_token else tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token; name one with eos_token")
        if style == SIDS_ANSWER:  # no explanation: no quote and no text mask (a decode of the whole vocabulary)
            return cls((), -1, (), (), (), int(eos), torch.zeros(0, dtype=torch.bool), explanation=False, top=top)
        quote = _encode(tokenizer, '"')
        if len(quote) != 1:
            raise ValueError(f'the tokenizer splits \'"\' into {len(quote)} tokens; a constrained answer needs one')
        sid_markers = {SID_BEGIN, SID_END}
        blocked = {i for tok, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)}
        for i, added in tokenizer.added_tokens_decoder.items():
            content = added.content
            is_sid = content in sid_markers or (content.startswith("<s_") and content.endswith(">"))
            if added.special and not is_sid:
                blocked.add(i)
        vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        mask = torch.zeros(vocab, dtype=torch.bool)
        pieces = tokenizer.batch_decode([[i] for i in range(vocab)], skip_special_tokens=False)
        for i, piece in enumerate(pieces):
            if i in blocked or not piece or '"' in piece or "\\" in piece or any(ord(c) < 0x20 for c in piece):
                continue
            mask[i] = True
        mask[quote[0]] = True  # the only way out of the explanation
        return cls(tuple(_encode(tokenizer, OPEN)), quote[0], tuple(_encode(tokenizer, MIDDLE)),
                   tuple(_encode(tokenizer, SEPARATOR)), tuple(_encode(tokenizer, CLOSE)), int(eos), mask, top=top)

    def slots(self, candidates: int) -> int:
        """SID slots of an answer over this many candidates."""
        return candidates if self.top is None else min(self.top, candidates)

    def max_tokens(self, candidates: Sequence[Sequence[int]], max_explanation_tokens: int) -> int:
        """Longest possible constrained answer (for `max_new_tokens` / `max_tokens`), eos included."""
        n = self.slots(len(candidates))
        longest = sorted((len(c) for c in candidates), reverse=True)[:n]
        slots = sum(longest) + len(self.separator_ids) * max(n - 1, 0)
        explanation = max_explanation_tokens + 1 if self.explanation else 0  # its text and the closing quote
        return len(self.open_ids) + explanation + len(self.middle_ids) + slots + len(self.close_ids) + 1


class RankingConstraint:
    """Allowed next tokens of one sequence, advanced with the tokens it actually generated.

    `allowed(output_ids)` accepts the whole output so far (vLLM and HF both hand over the full list) and only
    consumes what it has not seen. A token outside the allowed set (impossible when the mask was applied) turns
    the constraint off for the rest of the sequence, and the parser reports the answer as invalid.
    """

    def __init__(self, fmt: RankingAnswerFormat, candidates: Sequence[Sequence[int]], max_explanation_tokens: int,
                 first: int | None = None):
        """`first`: index of a candidate the ranking must start with (a teacher told the answer, target sampling)."""
        if not candidates:
            raise ValueError("a ranking constraint needs candidates")
        if len({tuple(c) for c in candidates}) != len(candidates):
            raise ValueError("candidate token sequences must be distinct")
        self.fmt = fmt
        self.max_explanation_tokens = max_explanation_tokens
        self.remaining = [tuple(c) for c in candidates]
        self.first = self.remaining[first] if first is not None else None
        program: list[tuple[str, tuple[int, ...]]] = []
        if fmt.explanation:
            program += [("force", fmt.open_ids), ("text", ()), ("force", fmt.middle_ids)]
        for n in range(fmt.slots(len(candidates))):
            if n:
                program.append(("force", fmt.separator_ids))
            program.append(("slot", ()))
        program += [("force", fmt.close_ids), ("force", (fmt.eos_id,))]
        self.program = [(kind, ids) for kind, ids in program if kind != "force" or ids]  # the sids style has no text
        self.segment = 0
        self.offset = 0  # tokens consumed inside the current segment
        self.partial: tuple[int, ...] = ()
        self.seen = 0
        self.broken = False

    @property
    def done(self) -> bool:
        return self.segment >= len(self.program)

    def _slot_children(self) -> list[int]:
        depth = len(self.partial)
        pool = [self.first] if self.first is not None and self.first in self.remaining else self.remaining
        return sorted({c[depth] for c in pool if c[:depth] == self.partial})

    def _allowed_now(self) -> list[int] | torch.Tensor | None:
        if self.broken or self.done:
            return None
        kind, ids = self.program[self.segment]
        if kind == "force":
            return [ids[self.offset]]
        if kind == "slot":
            return self._slot_children()
        if self.offset >= self.max_explanation_tokens:
            return [self.fmt.quote_id]
        return self.fmt.text_mask

    def _next_segment(self) -> None:
        self.segment += 1
        self.offset = 0

    def _consume(self, token: int) -> None:
        if self.broken or self.done:
            return
        kind, ids = self.program[self.segment]
        if kind == "force":
            if token != ids[self.offset]:
                self.broken = True
                return
            self.offset += 1
            if self.offset == len(ids):
                self._next_segment()
        elif kind == "slot":
            if token not in self._slot_children():
                self.broken = True
                return
            self.partial += (token,)
            if self.partial in self.remaining:
                self.remaining.remove(self.partial)
                self.partial = ()
                self._next_segment()
        elif token == self.fmt.quote_id:
            self._next_segment()
        elif self.offset < self.max_explanation_tokens and token < len(self.fmt.text_mask) and self.fmt.text_mask[token]:
            self.offset += 1
        else:
            self.broken = True

    def allowed(self, output_ids: Sequence[int]) -> list[int] | torch.Tensor | None:
        """Token ids (a list) or a [vocab] bool mask allowed next; None when unconstrained (done or broken)."""
        for token in output_ids[self.seen:]:
            self._consume(int(token))
        self.seen = len(output_ids)
        return self._allowed_now()

    def apply(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """`logits` ([vocab], one row) with every token outside the allowed set at -inf."""
        allowed = self.allowed(output_ids)
        if allowed is None:
            return logits
        if isinstance(allowed, torch.Tensor):
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            width = min(len(allowed), logits.shape[-1])
            keep[:width] = allowed[:width].to(logits.device)
            return logits.masked_fill_(~keep, float("-inf"))
        masked = torch.full_like(logits, float("-inf"))
        index = torch.tensor(allowed, dtype=torch.long, device=logits.device)
        masked[index] = logits[index]
        logits.copy_(masked)
        return logits


class HfRankingLogitsProcessor:
    """HF `generate` logits processor: row r of the batch follows `constraints[r]` (prompts left-padded to
    `prompt_width`; with `num_return_sequences` the rows of one prompt are consecutive)."""

    def __init__(self, constraints: Sequence[RankingConstraint], prompt_width: int):
        self.constraints = list(constraints)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.constraints):
            raise ValueError(f"{input_ids.shape[0]} rows but {len(self.constraints)} constraints")
        for row, constraint in enumerate(self.constraints):
            constraint.apply(input_ids[row, self.prompt_width:].tolist(), scores[row])
        return scores
