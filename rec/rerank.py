"""Re-ranking prompts and answers: what the teacher and the student read, and how a ranking is read back.

The prompt shows the user's history (SID + title, oldest first, cut to a token budget keeping the most recent
items; or, with `history_format: midtrain`, the bare SID sequence the mid-trained model learned from), the
candidate list (SID + title, in pre-rank order, or a seeded shuffle of it with `shuffle_candidates`), optional
domain-knowledge priming, and asks for step by step reasoning and a JSON answer ranking every candidate by SID, as
the GR2 teacher answers:

    {"explanation": "...", "recommendations": ["<|sid_begin|>...<|sid_end|>", ...]}

or, with `answer: sids`, the ranked SIDs alone, back to back (`format_answer`, `parse_answer` take the style).
Qwen3-style answers may put a `<think>...</think>` block first; `parse_answer` reads either form and checks the
ranking is a permutation of the candidates. Item text is escaped (`escape_text`) so a title can never produce a
chat marker, a SID or a line that looks like part of the prompt's structure.

>>> cands = [Item("<|sid_begin|><s_a_1><|sid_end|>", "Red lipstick"), Item("<|sid_begin|><s_a_2><|sid_end|>", "Mascara")]
>>> answer = format_answer("Likes lipstick.", [cands[1].sid, cands[0].sid])
>>> result = parse_answer(answer, [c.sid for c in cands])
>>> result.valid, result.ranking, result.explanation
(True, [1, 0], 'Likes lipstick.')
>>> parse_answer('{"recommendations": ["<|sid_begin|><s_a_1><|sid_end|>"]}', [c.sid for c in cands]).reason
'missing_candidates'
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_serializer, model_validator

from rec.config import ConfigError, Section

THINK_START = "<think>"
THINK_END = "</think>"

SYSTEM_PROMPT = (
    "You are a shopping assistant that re-ranks product recommendations. Products are identified by semantic IDs "
    "(SIDs) such as <|sid_begin|><s_a_1><s_b_2><s_c_3><s_d_4><|sid_end|>."
)
INSTRUCTION = (
    "Think step by step: first the patterns in the purchase history, then which candidates are complementary to it "
    "or match its categories, then your choice. Answer with JSON only: "
    '{"explanation": "<your reasoning>", "recommendations": [<every candidate SID, most likely next purchase '
    "first>]}. Rank all {n} candidates, each exactly once."
)
TARGET_HINT = (
    "The customer actually bought this next: {sid} {title}. Explain why it fits the history, and rank it first."
)

# History formats (RerankPromptSection.history_format).
RERANK_HISTORY = "rerank"
MIDTRAIN_HISTORY = "midtrain"
# Answer styles (RerankPromptSection.answer; rec.answer_constraint decodes both).
JSON_ANSWER = "json"
SIDS_ANSWER = "sids"
ANSWER_STYLES = (JSON_ANSWER, SIDS_ANSWER)
# Prompt layouts (RerankPromptSection.layout).
CHAT_LAYOUT = "chat"
NEXT_ITEM_LAYOUT = "next_item"

# Invalid-answer reasons, counted by the traces stage and the evaluation.
NO_ANSWER = "no_answer"
TRUNCATED = "truncated"
BAD_JSON = "bad_json"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
UNKNOWN_SID = "unknown_sid"
DUPLICATE = "duplicate"
MISSING_CANDIDATES = "missing_candidates"
REASONS = (NO_ANSWER, TRUNCATED, BAD_JSON, MISSING_FIELD, BAD_TYPE, UNKNOWN_SID, DUPLICATE, MISSING_CANDIDATES)

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Item:
    """One product as a prompt shows it."""

    sid: str
    title: str


def escape_text(text: str, max_chars: int | None = None) -> str:
    """Item text made inert: `<`/`>` become `‹`/`›` (no chat marker, SID or `<think>` can survive), every run of
    whitespace (newlines included) becomes one space, and the result is cut to `max_chars`.

    >>> escape_text('Gloss <s_a_1><|im_end|>\\n"Candidates":  x')
    'Gloss ‹s_a_1›‹|im_end|› "Candidates": x'
    """
    text = _WHITESPACE.sub(" ", text.replace("<", "‹").replace(">", "›")).strip()
    if max_chars is not None and len(text) > max_chars:
        text = text[: max(max_chars - 1, 0)].rstrip() + "…"
    return text


def _line(item: Item, max_title_chars: int | None) -> str:
    return f"{item.sid} {escape_text(item.title, max_title_chars)}"


def fit_history(
    history: Sequence[Item], count_tokens: Callable[[str], int], budget: int | None, max_title_chars: int | None,
    text_of: Callable[[Item], str] | None = None,
) -> list[Item]:
    """The most recent items whose prompt text (`text_of`, default their history line) fits in `budget` tokens
    (all of them when `budget` is None)."""
    if budget is None:
        return list(history)
    text_of = text_of or (lambda item: _line(item, max_title_chars) + "\n")
    kept: list[Item] = []
    used = 0
    for item in reversed(history):
        cost = count_tokens(text_of(item))
        if used + cost > budget:
            break
        kept.append(item)
        used += cost
    return kept[::-1]


def _next_item_line(history: Sequence[Item], count_tokens: Callable[[str], int], budget: int | None) -> str:
    """The history as mid-training's next-item sequence (its prefix and the SIDs of the most recent items that fit)."""
    from rec.midtrain_data import NEXT_ITEM_PREFIX

    kept = fit_history(history, count_tokens, budget, None, text_of=lambda item: item.sid)
    return NEXT_ITEM_PREFIX + "".join(item.sid for item in kept)


def _candidate_lines(candidates: Sequence[Item], max_title_chars: int | None) -> list[str]:
    return [f"{n}. {_line(item, max_title_chars)}" for n, item in enumerate(candidates, 1)]


def _hint_lines(priming: str | None, target: Item | None, max_title_chars: int | None) -> list[str]:
    """The priming and the target hint (target sampling), each after a blank line, when given."""
    lines = ["", priming.strip()] if priming else []
    if target is not None:
        lines += ["", TARGET_HINT.format(sid=target.sid, title=escape_text(target.title, max_title_chars))]
    return lines


def build_messages(
    history: Sequence[Item],
    candidates: Sequence[Item],
    *,
    target: Item | None = None,
    priming: str | None = None,
    count_tokens: Callable[[str], int] = lambda text: len(text.split()),
    history_token_budget: int | None = None,
    max_title_chars: int | None = 120,
    history_format: str = RERANK_HISTORY,
) -> list[dict[str, str]]:
    """Chat messages (system, user) of a re-rank prompt; `target` adds the true next item (target sampling).
    `history_format` is a `RerankPromptSection.history_format`."""
    if not candidates:
        raise ValueError("a re-rank prompt needs at least one candidate")
    if history_format == MIDTRAIN_HISTORY:
        lines = [_next_item_line(history, count_tokens, history_token_budget)]
    elif history_format == RERANK_HISTORY:
        kept = fit_history(history, count_tokens, history_token_budget, max_title_chars)
        lines = [f"Purchase history, oldest first ({len(kept)} of {len(history)} items):"]
        lines += [f"{n}. {_line(item, max_title_chars)}" for n, item in enumerate(kept, 1)] or ["(none)"]
    else:
        raise ValueError(f"unknown history_format {history_format!r}; known: {RERANK_HISTORY}, {MIDTRAIN_HISTORY}")
    lines += ["", f"Candidates, in the order a first-stage ranker proposed them ({len(candidates)}):"]
    lines += _candidate_lines(candidates, max_title_chars) + _hint_lines(priming, target, max_title_chars)
    lines += ["", INSTRUCTION.replace("{n}", str(len(candidates)))]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


def build_next_item_text(
    history: Sequence[Item],
    candidates: Sequence[Item],
    *,
    target: Item | None = None,
    priming: str | None = None,
    count_tokens: Callable[[str], int] = lambda text: len(text.split()),
    history_token_budget: int | None = None,
    max_title_chars: int | None = 120,
) -> str:
    """The `next_item` layout's prompt: plain text, no chat template and no instruction. The candidate lines come
    first, then any priming and target hint, and last the history as mid-training's next-item sequence, so that the
    answer's first SID continues the sequence the mid-trained model learned to continue.

    >>> items = [Item("<|sid_begin|><s_a_1><|sid_end|>", "Red lipstick"), Item("<|sid_begin|><s_a_2><|sid_end|>", "Mascara")]
    >>> print(build_next_item_text(items[:1], items[1:]))
    Candidates:
    1. <|sid_begin|><s_a_2><|sid_end|> Mascara
    <BLANKLINE>
    Purchase history:<|sid_begin|><s_a_1><|sid_end|>
    """
    if not candidates:
        raise ValueError("a re-rank prompt needs at least one candidate")
    lines = ["Candidates:"] + _candidate_lines(candidates, max_title_chars) + _hint_lines(priming, target, max_title_chars)
    return "\n".join(lines + ["", _next_item_line(history, count_tokens, history_token_budget)])


def format_answer(explanation: str, ranking_sids: Sequence[str], style: str = JSON_ANSWER) -> str:
    """The answer text the parser reads (and SFT targets): one JSON object, or for the `sids` style
    (`RerankPromptSection.answer`) the SIDs back to back (no explanation).

    >>> format_answer("why", ["<|sid_begin|><s_a_2><|sid_end|>", "<|sid_begin|><s_a_1><|sid_end|>"], "sids")
    '<|sid_begin|><s_a_2><|sid_end|><|sid_begin|><s_a_1><|sid_end|>'
    """
    if style == SIDS_ANSWER:
        return "".join(ranking_sids)
    if style != JSON_ANSWER:
        raise ValueError(f"unknown answer style {style!r}; known: {', '.join(ANSWER_STYLES)}")
    return json.dumps({"explanation": explanation, "recommendations": list(ranking_sids)}, ensure_ascii=False)


@dataclass
class ParseResult:
    """A parsed answer: `ranking` holds candidate positions (0-based, best first) when `valid`."""

    valid: bool
    ranking: list[int] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    explanation: str = ""


def _invalid(reason: str, detail: str, explanation: str = "") -> ParseResult:
    return ParseResult(valid=False, reason=reason, detail=detail, explanation=explanation)


def split_thinking(text: str) -> tuple[str, str | None]:
    """(reasoning, answer) of a completion; answer is None when a `<think>` block never closed."""
    start = text.find(THINK_START)
    end = text.find(THINK_END)
    if end >= 0:
        reasoning_start = start + len(THINK_START) if 0 <= start < end else 0
        return text[reasoning_start:end].strip(), text[end + len(THINK_END):]
    if start >= 0:
        return text[start + len(THINK_START):].strip(), None
    return "", text


def _unclosed(text: str, start: int) -> bool:
    """Whether the JSON value starting at `start` is still open (a string or bracket) when the text ends."""
    depth, in_string, escaped = 0, False, False
    for char in text[start:]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return False
    return True


def _ranking_of(ranked: Sequence[str], candidate_sids: Sequence[str], explanation: str, top: int | None = None
                ) -> ParseResult:
    """`ranked` SID strings as candidate positions when they are a permutation of `candidate_sids`; with `top`, when
    they name at least `top` distinct candidates (the ones not named follow in their incoming order)."""
    position = {sid: n for n, sid in enumerate(candidate_sids)}
    ranking: list[int] = []
    for sid in (s.strip() for s in ranked):
        if sid not in position:
            return _invalid(UNKNOWN_SID, f"{sid!r} is not a candidate", explanation)
        if position[sid] in ranking:
            return _invalid(DUPLICATE, f"{sid!r} is ranked twice", explanation)
        ranking.append(position[sid])
    needed = len(candidate_sids) if top is None else min(top, len(candidate_sids))
    if len(ranking) < needed:
        return _invalid(MISSING_CANDIDATES, f"{needed - len(ranking)} candidate(s) not ranked", explanation)
    ranking += [p for p in range(len(candidate_sids)) if p not in ranking]
    return ParseResult(valid=True, ranking=ranking, explanation=explanation)


def _parse_sids(answer: str, candidate_sids: Sequence[str], reasoning: str, top: int | None = None) -> ParseResult:
    """The `sids` style: every `<|sid_begin|>...<|sid_end|>` span in order (text between them is ignored; an
    unclosed last one is a cut answer)."""
    from rec.sid.codes import SID_BEGIN, SID_END

    spans = re.findall(re.escape(SID_BEGIN) + ".*?" + re.escape(SID_END), answer, flags=re.S)
    last_begin = answer.rfind(SID_BEGIN)
    if last_begin >= 0 and answer.find(SID_END, last_begin) < 0:
        return _invalid(TRUNCATED, "the answer ends inside a SID", reasoning)
    if not spans:
        return _invalid(NO_ANSWER, "no SID in the answer", reasoning)
    return _ranking_of(spans, candidate_sids, reasoning, top)


def parse_answer(text: str, candidate_sids: Sequence[str], style: str = JSON_ANSWER, top: int | None = None
                 ) -> ParseResult:
    """The ranking in `text` as candidate positions, or why there is none. With `top` (`RerankPromptSection.
    answer_top`) the answer need only rank that many; the candidates it leaves out follow in their incoming order.

    Accepted: optional `<think>...</think>`, then a JSON object with a `recommendations` list of SID strings that
    is a permutation of `candidate_sids`; text around the object is ignored. An `explanation` string is returned
    when present (else the thinking text). The `sids` style reads the SIDs of the answer in order instead.

    >>> sids = ["<|sid_begin|><s_a_1><|sid_end|>", "<|sid_begin|><s_a_2><|sid_end|>"]
    >>> parse_answer(sids[1] + sids[0], sids, "sids").ranking
    [1, 0]
    >>> parse_answer(sids[1] + "<|sid_begin|><s_a", sids, "sids").reason
    'truncated'
    >>> parse_answer(sids[1], sids + ["<|sid_begin|><s_a_3><|sid_end|>"], "sids", top=1).ranking
    [1, 0, 2]
    """
    reasoning, answer = split_thinking(text)
    if answer is None:
        return _invalid(TRUNCATED, "the <think> block never closed", reasoning)
    if style == SIDS_ANSWER:
        return _parse_sids(answer, candidate_sids, reasoning, top)
    start = answer.find("{")
    if start < 0:
        return _invalid(NO_ANSWER, "no JSON object in the answer", reasoning)
    try:
        payload, _ = json.JSONDecoder().raw_decode(answer, start)
    except json.JSONDecodeError as err:
        return _invalid(TRUNCATED if _unclosed(answer, start) else BAD_JSON, str(err), reasoning)
    if not isinstance(payload, dict) or "recommendations" not in payload:
        return _invalid(MISSING_FIELD, "the JSON object has no 'recommendations'", reasoning)
    explanation = payload.get("explanation")
    explanation = explanation if isinstance(explanation, str) else reasoning
    ranked = payload["recommendations"]
    if not isinstance(ranked, list) or not all(isinstance(sid, str) for sid in ranked):
        return _invalid(BAD_TYPE, "'recommendations' must be a list of SID strings", explanation)
    return _ranking_of(ranked, candidate_sids, explanation, top)


def final_ranking(parsed: ParseResult, candidates: Sequence[int]) -> tuple[list[int], str | None]:
    """The re-ranked item ids, or the incoming (pre-rank) order with the reason when the answer is unusable.

    >>> final_ranking(ParseResult(valid=True, ranking=[1, 0]), [7, 8])
    ([8, 7], None)
    >>> final_ranking(ParseResult(valid=False, reason="truncated"), [7, 8])
    ([7, 8], 'truncated')
    """
    if parsed.valid:
        return [candidates[p] for p in parsed.ranking], None
    return list(candidates), parsed.reason


DATASET_PRIMING = "dataset"


class RerankPromptSection(Section):
    """How re-rank prompts are built; the teacher, SFT, evaluation, RL and serving all read this section."""

    history_token_budget: int | None = Field(default=400, ge=0)
    """Tokens for the history lines (the most recent items that fit); null keeps all."""
    max_title_chars: int | None = Field(default=100, ge=8)
    """Titles longer than this are cut."""
    priming: str | None = None
    """Domain knowledge added to every prompt (what sells together in this catalogue): the text, or `dataset` for
    the `priming` of the dataset's metadata (data/dataset.json, from the dataset folder's dataset.json), or null."""
    chat_template_kwargs: dict = Field(default_factory=dict)
    """Extra arguments for the tokenizer's chat template, e.g. {enable_thinking: true} for Qwen3."""
    shuffle_candidates: bool = False
    """List the candidates in a seeded random order (rec.consistency.shuffled, keyed by the list's history and
    candidates: the same order in every rerun) instead of the pre-rank order, so that a model trained on such prompts
    cannot lean on position. Only the prompt text changes: answers name candidates by SID and are read against the
    pre-rank list, so teacher traces stay valid SFT answers and RL rewards and metrics still measure against the
    pre-rank order. Saved with the model (gr2_rerank.json), so evaluation and serving show it shuffled lists too."""
    history_format: Literal["rerank", "midtrain"] = RERANK_HISTORY
    """How the history is written: `rerank`, a numbered line per item (SID + title, oldest first); `midtrain`, the
    mid-training next-item sequence (`Purchase history:` and the SIDs back to back, no titles, as
    rec.midtrain_data.next_item_prompt_ids writes it), so that what the mid-trained model learned about the next
    item carries over. Candidates are written the same way in both."""

    layout: Literal["chat", "next_item"] = CHAT_LAYOUT
    """`chat`: the instruction, history and candidates as a chat (system + user turn, the tokenizer's chat template).
    `next_item`, for a student mid-trained on SIDs but never chat-tuned (the tiny presets): plain text, the candidate
    lines first and the history last as mid-training's next-item sequence, so the answer's first SID continues what
    the model learned (rec.rerank.build_next_item_text; needs `history_format: midtrain`). The answer's form is
    `answer`, either way (bench/prompt_transfer.py measures what each layout keeps of the mid-trained knowledge)."""
    answer: Literal["json", "sids"] = JSON_ANSWER
    """`json`: `{"explanation": ..., "recommendations": [SIDs]}`, as the GR2 teacher answers. `sids`: the ranking
    alone, the SIDs back to back and then eos, so that with `layout: next_item` the first answer token is the one
    mid-training learned to predict after the history (no JSON opening between them). SFT re-writes a teacher's
    accepted ranking in this style; saved with the model, so evaluation, RL and serving read answers the same way."""
    answer_top: int | None = Field(default=None, ge=1)
    """With `answer: sids`: the answer ranks only its first `answer_top` picks (a constrained answer has that many
    SID slots), and the candidates it leaves out follow in the order they came. `1`: the re-ranker chooses which
    candidate goes first and the rest keep the pre-rank order, a short answer (one SID) whose every token RL trains
    on the choice that moves N@5 most. null ranks every candidate."""

    @model_validator(mode="after")
    def _check_layout(self) -> RerankPromptSection:
        if self.layout == NEXT_ITEM_LAYOUT and self.history_format != MIDTRAIN_HISTORY:
            raise ValueError(f"prompt.layout={NEXT_ITEM_LAYOUT} writes the history as mid-training did: set "
                             f"prompt.history_format={MIDTRAIN_HISTORY}")
        if self.answer_top is not None and self.answer != SIDS_ANSWER:
            raise ValueError(f"prompt.answer_top ranks part of the list, which only the {SIDS_ANSWER!r} answer "
                             f"says (the chat instruction asks for every candidate): set prompt.answer={SIDS_ANSWER}")
        return self

    @model_serializer(mode="wrap")
    def _leave_out_defaults_added_later(self, handler):
        # fields added after runs were recorded are left out at their default: the fingerprints of those runs (traces,
        # sft, rl, evaluate) and the gr2_rerank.json of their models stay what they were
        data = handler(self)
        for name, default in (("shuffle_candidates", False), ("history_format", RERANK_HISTORY),
                              ("layout", CHAT_LAYOUT), ("answer", JSON_ANSWER), ("answer_top", None)):
            if getattr(self, name) == default:
                data.pop(name, None)
        return data


class RerankSamplingSection(Section):
    """How answers are sampled (teacher traces, evaluation, RL rollouts, serving)."""

    temperature: float = Field(default=1.0, ge=0)
    """0 is greedy."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=1024, ge=1)
    """Longest unconstrained answer (a constrained answer's length is fixed by its format)."""
    constrained: bool = False
    """Decode under rec.answer_constraint: every answer is a valid ranking; the explanation is free text."""
    max_explanation_tokens: int = Field(default=64, ge=0)
    """Explanation budget of a constrained answer; 0 forces an empty one (`{"explanation": "", ...}`: the ranking
    alone, reasoning-free). Unconstrained answers are not bound by it."""


def eos_token_id(tokenizer, eos_token: str, model: str) -> int:
    """Id of the token that ends an answer; an error naming the model when its tokenizer lacks it."""
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise ConfigError(f"eos_token {eos_token!r} is not a token of {model}")
    return eos_id


class PromptBuilder:
    """Re-rank prompts for one tokenizer and catalogue: item ids in, chat text and token ids out."""

    def __init__(self, tokenizer, sid_of: Mapping[int, str], title_of: Mapping[int, str], section: RerankPromptSection):
        self.tokenizer = tokenizer
        self.sid_of = sid_of
        self.title_of = title_of
        self.section = section

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def item(self, item_id: int) -> Item:
        try:
            return Item(self.sid_of[int(item_id)], self.title_of.get(int(item_id), ""))
        except KeyError:
            raise KeyError(f"item {item_id} has no SID in sid/sid_map.parquet") from None

    def shown_order(self, history: Sequence[int], candidates: Sequence[int]) -> list[int]:
        """The candidates in the order the prompt lists them: the incoming order, or its seeded shuffle."""
        shown = list(candidates)
        if self.section.shuffle_candidates:  # the prompt text only: answers are read against `candidates` by SID
            from rec.consistency import list_key, shuffled

            shown = shuffled(shown, list_key(history, candidates))
        return shown

    def _build(self, build, history: Sequence[int], candidates: Sequence[int], target: int | None, **extra):
        """`build_messages` or `build_next_item_text` on these items, with the section's settings."""
        s = self.section
        return build(
            [self.item(i) for i in history], [self.item(i) for i in self.shown_order(history, candidates)],
            target=self.item(target) if target is not None else None, priming=s.priming,
            count_tokens=self.count_tokens, history_token_budget=s.history_token_budget,
            max_title_chars=s.max_title_chars, **extra,
        )

    def messages(self, history: Sequence[int], candidates: Sequence[int], target: int | None = None) -> list[dict]:
        return self._build(build_messages, history, candidates, target, history_format=self.section.history_format)

    @classmethod
    def for_run(cls, tokenizer, run_dir, section: RerankPromptSection) -> PromptBuilder:
        """The builder for a run directory's catalogue (`rec.io.RunDir`), with `priming: dataset` resolved."""
        if section.priming == DATASET_PRIMING:
            metadata = run_dir.read_json("data", "dataset.json") if run_dir.exists("data", "dataset.json") else {}
            section = section.model_copy(update={"priming": metadata.get("priming")})
        return cls(tokenizer, *catalogue(run_dir), section)

    def prompt(self, history: Sequence[int], candidates: Sequence[int], target: int | None = None) -> tuple[str, list[int]]:
        """(the text the answer follows: the chat up to the assistant turn, or the `next_item` layout's plain text;
        its token ids)."""
        if self.section.layout == NEXT_ITEM_LAYOUT:
            text = self._build(build_next_item_text, history, candidates, target)
        else:
            text = self.tokenizer.apply_chat_template(self.messages(history, candidates, target), tokenize=False,
                                                      add_generation_prompt=True, **self.section.chat_template_kwargs)
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def candidate_sids(self, candidates: Sequence[int]) -> list[str]:
        return [self.sid_of[int(i)] for i in candidates]

    def candidate_token_ids(self, candidates: Sequence[int]) -> list[list[int]]:
        return [self.tokenizer(self.sid_of[int(i)], add_special_tokens=False)["input_ids"] for i in candidates]


def catalogue(run_dir) -> tuple[dict[int, str], dict[int, str]]:
    """(item id -> SID string, item id -> title) of a run directory (`rec.io.RunDir`)."""
    from rec.sid.codes import render_sid

    sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
    items = run_dir.read_parquet("data", "items.parquet").select(["item_id", "title"]).to_pydict()
    return ({int(i): render_sid(c) for i, c in zip(sid_map["item_id"], sid_map["codes"])},
            {int(i): t or "" for i, t in zip(items["item_id"], items["title"])})
