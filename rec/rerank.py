"""Re-ranking prompts and answers: what the teacher and the student read, and how a ranking is read back.

The prompt shows the user's history (SID + title, oldest first, cut to a token budget keeping the most recent
items), the candidate list (SID + title, in pre-rank order), optional domain-knowledge priming, and asks for step
by step reasoning and a JSON answer ranking every candidate by SID, as the GR2 teacher answers:

    {"explanation": "...", "recommendations": ["<|sid_begin|>...<|sid_end|>", ...]}

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

from pydantic import Field, ValidationError

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
    history: Sequence[Item], count_tokens: Callable[[str], int], budget: int | None, max_title_chars: int | None
) -> list[Item]:
    """The most recent items whose prompt lines fit in `budget` tokens (all of them when `budget` is None)."""
    if budget is None:
        return list(history)
    kept: list[Item] = []
    used = 0
    for item in reversed(history):
        cost = count_tokens(_line(item, max_title_chars) + "\n")
        if used + cost > budget:
            break
        kept.append(item)
        used += cost
    return kept[::-1]


def build_messages(
    history: Sequence[Item],
    candidates: Sequence[Item],
    *,
    target: Item | None = None,
    priming: str | None = None,
    count_tokens: Callable[[str], int] = lambda text: len(text.split()),
    history_token_budget: int | None = None,
    max_title_chars: int | None = 120,
) -> list[dict[str, str]]:
    """Chat messages (system, user) of a re-rank prompt; `target` adds the true next item (target sampling)."""
    if not candidates:
        raise ValueError("a re-rank prompt needs at least one candidate")
    kept = fit_history(history, count_tokens, history_token_budget, max_title_chars)
    lines = [f"Purchase history, oldest first ({len(kept)} of {len(history)} items):"]
    lines += [f"{n}. {_line(item, max_title_chars)}" for n, item in enumerate(kept, 1)] or ["(none)"]
    lines += ["", f"Candidates, in the order a first-stage ranker proposed them ({len(candidates)}):"]
    lines += [f"{n}. {_line(item, max_title_chars)}" for n, item in enumerate(candidates, 1)]
    if priming:
        lines += ["", priming.strip()]
    if target is not None:
        lines += ["", TARGET_HINT.format(sid=target.sid, title=escape_text(target.title, max_title_chars))]
    lines += ["", INSTRUCTION.replace("{n}", str(len(candidates)))]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


def format_answer(explanation: str, ranking_sids: Sequence[str]) -> str:
    """The answer text the parser reads (and SFT targets): one JSON object."""
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


def parse_answer(text: str, candidate_sids: Sequence[str]) -> ParseResult:
    """The ranking in `text` as candidate positions, or why there is none.

    Accepted: optional `<think>...</think>`, then a JSON object with a `recommendations` list of SID strings that
    is a permutation of `candidate_sids`; text around the object is ignored. An `explanation` string is returned
    when present (else the thinking text).
    """
    reasoning, answer = split_thinking(text)
    if answer is None:
        return _invalid(TRUNCATED, "the <think> block never closed", reasoning)
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
    position = {sid: n for n, sid in enumerate(candidate_sids)}
    ranking: list[int] = []
    for sid in (s.strip() for s in ranked):
        if sid not in position:
            return _invalid(UNKNOWN_SID, f"{sid!r} is not a candidate", explanation)
        if position[sid] in ranking:
            return _invalid(DUPLICATE, f"{sid!r} is ranked twice", explanation)
        ranking.append(position[sid])
    if len(ranking) != len(candidate_sids):
        return _invalid(MISSING_CANDIDATES, f"{len(candidate_sids) - len(ranking)} candidate(s) not ranked",
                        explanation)
    return ParseResult(valid=True, ranking=ranking, explanation=explanation)


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


class RerankPromptSection(Section):
    """How re-rank prompts are built; the teacher, SFT, evaluation, RL and serving all read this section."""

    history_token_budget: int | None = Field(default=400, ge=0)
    """Tokens for the history lines (the most recent items that fit); null keeps all."""
    max_title_chars: int | None = Field(default=100, ge=8)
    """Titles longer than this are cut."""
    priming: str | None = None
    """Domain knowledge added to every prompt (e.g. what sells together in beauty)."""
    chat_template_kwargs: dict = Field(default_factory=dict)
    """Extra arguments for the tokenizer's chat template, e.g. {enable_thinking: true} for Qwen3."""


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
    """Explanation budget of a constrained answer."""


RERANK_SETTINGS = "gr2_rerank.json"
"""A re-ranker model folder's settings, written by the SFT stage, read by evaluation, RL and serving:
`{"prompt": {...RerankPromptSection...}, "eos_token": "<|im_end|>", "lengths": {...RerankLengths...}}`. Files
written before `lengths` existed stay readable (their lengths are unknown and only the engine fit is checked)."""

# --- length budgets: one source of truth ------------------------------------------------------------------------
# The trained answer budget travels with the model (RerankLengths); readers compare their sampling and engine to it
# with `check_lengths`. Prompt lengths are estimated from the config alone (no tokenizer): the history is budgeted
# in the engine's own tokens; candidate lines and the fixed text are estimated with the allowances below, measured
# on the tiny preset's 8,192-token BPE (template ~280 tokens; an 80-character Beauty title ~18 tokens, 4.4 chars per
# token) and rounded up, so Qwen3's 151k-token vocabulary (which needs fewer) is covered too.
DEFAULT_CANDIDATES = 10
"""Candidates per list when a stage cannot know (the paper re-ranks the pre-ranker's top 10)."""
PROMPT_TEMPLATE_TOKENS = 320
"""System prompt, instruction, section headers, chat markers, Qwen3's empty think block when thinking is off, and
target sampling's hint line (measured: ~280 with the tiny tokenizer). Priming is counted on top."""
TITLE_CHARS_PER_TOKEN = 3
"""Characters per token of a title or the priming text (measured ~4.4; numbers, units and entities lower it)."""
CANDIDATE_LINE_TOKENS = 4
"""A candidate line's number, space and newline."""
UNCUT_TITLE_TOKENS = 128
"""Allowance for a title when `max_title_chars` is null (prepare caps titles at 1,000 chars; most are short)."""
STUDENT_SID_TOKENS = 8
"""A SID in a tokenizer that has SID tokens (the student's: `<|sid_begin|>`, one token per level, `<|sid_end|>` = 6)."""
TEXT_SID_TOKENS = 32
"""A SID in a tokenizer without SID tokens (a hub teacher such as Qwen3-32B reads `<s_a_97>` as ~5 BPE pieces)."""
CONSTRAINED_ANSWER_TOKENS = 24
"""The fixed JSON of a constrained answer (keys, quotes, brackets, eos); per candidate a SID and a separator
(`CANDIDATE_SEPARATOR_TOKENS`) and the explanation budget come on top."""
CANDIDATE_SEPARATOR_TOKENS = 4


class RerankLengths(Section):
    """What a re-ranker was trained to write (saved with the model in `gr2_rerank.json`); a reader whose config
    allows fewer answer tokens would cut answers the model writes, and every cut answer falls back to the pre-rank
    order with no other sign."""

    max_answer_tokens: int = Field(ge=1)
    """The answer budget the model was trained for: the teacher's sampling.max_tokens for unconstrained traces (an
    answer was cut there), else the longest answer trained on. An unconstrained reader's max_tokens must be >= this."""
    longest_answer_tokens: int | None = Field(default=None, ge=1)
    """Longest answer (completion + eos, in the model's tokens) among the training examples."""
    longest_prompt_tokens: int | None = Field(default=None, ge=1)
    """Longest prompt among the training examples."""
    teacher_max_tokens: int | None = Field(default=None, ge=1)
    """The traces stage's sampling.max_tokens (from the traces file's config); null when unknown."""
    constrained: bool | None = None
    """Whether the trained answers were decoded under the ranking constraint (their length is then fixed by the
    format and the explanation budget, not by max_tokens)."""
    max_explanation_tokens: int | None = Field(default=None, ge=0)
    """The traces' explanation budget of a constrained answer."""
    max_len: int | None = Field(default=None, ge=1)
    """SFT's max_len (longest prompt + answer trained on; longer examples were dropped)."""


@dataclass(frozen=True)
class RerankSettings:
    """How a re-ranker is prompted and what it was trained to write; `source` names where they came from (a
    `gr2_rerank.json`, or a config file) for error messages."""

    prompt: RerankPromptSection
    eos_token: str | None = None
    lengths: RerankLengths | None = None
    source: str = "config"
    prompt_field: str = "prompt"
    """Where `prompt` sits in `source` (a config's fallback section may be nested, e.g. `reranker.prompt`)."""
    trained_field: str | None = None
    """The field `lengths.max_answer_tokens` came from, as errors name it (default: in `source`)."""

    @property
    def answer_field(self) -> str:
        return self.trained_field or f"{self.source} lengths.max_answer_tokens"


def rerank_settings_json(prompt: RerankPromptSection, eos_token: str, lengths: RerankLengths | None = None) -> dict:
    data = {"prompt": prompt.model_dump(mode="json"), "eos_token": eos_token}
    if lengths is not None:
        data["lengths"] = lengths.model_dump(mode="json")
    return data


def read_model_settings(path: str) -> RerankSettings | None:
    """The settings in a `gr2_rerank.json` (lengths None in files written before they were saved); None when there is
    no such file; a ConfigError naming the file and field when it is not valid."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        return None
    section = "prompt"
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), dict):
            raise ValueError('expected {"prompt": {...}, "eos_token": "...", "lengths": {...}}')
        eos = data.get("eos_token")
        if eos is not None and not isinstance(eos, str):
            raise ValueError(f"eos_token must be a string, got {eos!r}")
        prompt = RerankPromptSection.model_validate(data["prompt"])
        section = "lengths"
        lengths = RerankLengths.model_validate(data["lengths"]) if data.get("lengths") is not None else None
        return RerankSettings(prompt, eos, lengths, source=str(file))
    except ValidationError as err:
        fields = "; ".join(f"{section}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{file}: not valid re-rank settings: {fields}") from None
    except ValueError as err:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{file}: not valid re-rank settings: {err}") from None


def read_rerank_settings(path: str) -> tuple[RerankPromptSection, str | None] | None:
    """(prompt section, eos token or None) from a `gr2_rerank.json`; None when there is no such file."""
    found = read_model_settings(path)
    return None if found is None else (found.prompt, found.eos_token)


def load_model_settings(model_dir: str, prompt: RerankPromptSection, eos_token: str, config: str = "config",
                        prompt_field: str = "prompt") -> RerankSettings:
    """The settings a re-ranker checkpoint is prompted with: its own `gr2_rerank.json` when it has one (the prompt
    it was trained on, and its lengths), else the given defaults with unknown lengths (named `config` `prompt_field`
    in errors)."""
    from pathlib import Path

    found = read_model_settings(str(Path(model_dir) / RERANK_SETTINGS))
    if found is None:
        return RerankSettings(prompt, eos_token, None, source=config, prompt_field=prompt_field)
    return RerankSettings(found.prompt, found.eos_token or eos_token, found.lengths, found.source)


def model_rerank_settings(model_dir: str, prompt: RerankPromptSection, eos_token: str
                          ) -> tuple[RerankPromptSection, str]:
    """(prompt section, eos token) a re-ranker checkpoint is prompted with: its own `gr2_rerank.json` when it has
    one (the prompt it was trained on), else the given defaults (evaluation, RL and serving all ask this)."""
    found = load_model_settings(model_dir, prompt, eos_token)
    return found.prompt, found.eos_token


def candidate_tokens(prompt: RerankPromptSection, sid_tokens: int = STUDENT_SID_TOKENS) -> int:
    """Estimated tokens of one candidate line."""
    title = (UNCUT_TITLE_TOKENS if prompt.max_title_chars is None
             else -(-prompt.max_title_chars // TITLE_CHARS_PER_TOKEN))
    return sid_tokens + title + CANDIDATE_LINE_TOKENS


def prompt_token_estimate(prompt: RerankPromptSection, candidates: int = DEFAULT_CANDIDATES,
                          sid_tokens: int = STUDENT_SID_TOKENS) -> int | None:
    """Upper estimate of a re-rank prompt's tokens: the history budget + the candidate lines + the template and
    priming (module constants above); None when the history is unbounded (`history_token_budget` null).

    >>> prompt_token_estimate(RerankPromptSection(history_token_budget=400, max_title_chars=80))
    1110
    """
    if prompt.history_token_budget is None:
        return None
    priming = -(-len(prompt.priming) // TITLE_CHARS_PER_TOKEN) if prompt.priming else 0
    return (prompt.history_token_budget + candidates * candidate_tokens(prompt, sid_tokens) + PROMPT_TEMPLATE_TOKENS
            + priming)


def answer_token_budget(sampling: RerankSamplingSection, candidates: int = DEFAULT_CANDIDATES,
                        sid_tokens: int = STUDENT_SID_TOKENS) -> int:
    """The most answer tokens `sampling` lets a model write: max_tokens, or for a constrained answer its format's
    length (estimated: explanation budget + candidates' SIDs and separators + the fixed JSON).

    >>> answer_token_budget(RerankSamplingSection(max_tokens=512, constrained=True, max_explanation_tokens=48))
    192
    """
    if not sampling.constrained:
        return sampling.max_tokens
    return (CONSTRAINED_ANSWER_TOKENS + sampling.max_explanation_tokens
            + candidates * (sid_tokens + CANDIDATE_SEPARATOR_TOKENS))


def check_lengths(settings: RerankSettings, sampling: RerankSamplingSection, max_model_len: int, where: str, *,
                  sampling_field: str = "sampling", engine_field: str = "engine",
                  candidates: int = DEFAULT_CANDIDATES, sid_tokens: int = STUDENT_SID_TOKENS) -> list[str]:
    """Contradictions between what a re-ranker was trained to write (`settings`) and a reader's sampling and engine,
    each naming both fields; empty when they agree. `where` names the reader (a config file or a stage) and the
    `*_field`s where its sampling section and engine's max_model_len sit in it.

    - unconstrained sampling must allow at least `settings.lengths.max_answer_tokens` (when known): shorter, the
      answers the model was trained to write are cut and fall back to the pre-rank order. A constrained reader's
      answers are closed by the constraint (a smaller explanation budget shortens the explanation, never
      invalidates the ranking), so only its engine fit is checked.
    - the engine must hold the prompt (`prompt_token_estimate` of the settings' prompt) + the answer budget.

    >>> trained = RerankSettings(RerankPromptSection(), lengths=RerankLengths(max_answer_tokens=4096), source="m.json")
    >>> problems = check_lengths(trained, RerankSamplingSection(max_tokens=1024), 8192, "serving",
    ...                          sampling_field="reranker.sampling")
    >>> problems[0][:82]
    'serving reranker.sampling.max_tokens=1024 < m.json lengths.max_answer_tokens=4096 '
    >>> check_lengths(trained, RerankSamplingSection(max_tokens=4096), 8192, "serving")
    []
    """
    problems = []
    lengths = settings.lengths
    if lengths is not None and not sampling.constrained and sampling.max_tokens < lengths.max_answer_tokens:
        problems.append(f"{where} {sampling_field}.max_tokens={sampling.max_tokens} < {settings.answer_field}="
                        f"{lengths.max_answer_tokens} (trained on): answers the model was trained to write would be "
                        "cut and fall back to the pre-rank order")
    prompt = prompt_token_estimate(settings.prompt, candidates, sid_tokens)
    budget = f"{settings.source} {settings.prompt_field}.history_token_budget"
    if prompt is None:
        problems.append(f"{where} {engine_field}.max_model_len={max_model_len} cannot be shown to hold the prompt: "
                        f"{budget} is null (unbounded history); set a budget")
        return problems
    answer = answer_token_budget(sampling, candidates, sid_tokens)
    if prompt + answer > max_model_len:
        per_candidate = candidate_tokens(settings.prompt, sid_tokens)
        answer_from = (f"{sampling_field}.max_explanation_tokens={sampling.max_explanation_tokens} constrained"
                       if sampling.constrained else f"{sampling_field}.max_tokens={sampling.max_tokens}")
        problems.append(
            f"{where} {engine_field}.max_model_len={max_model_len} < prompt ~{prompt} ({budget}="
            f"{settings.prompt.history_token_budget} + {candidates} candidates x {per_candidate}"
            f" + template) + answer {answer} ({where} {answer_from}): such prompts are not sent and fall back "
            f"(prompt_too_long); raise max_model_len to >= {prompt + answer}")
    return problems


def require_lengths(settings: RerankSettings, sampling: RerankSamplingSection, max_model_len: int, where: str,
                    **fields) -> RerankSettings:
    """`check_lengths`, raising a ConfigError with every contradiction; returns `settings` when there is none."""
    problems = check_lengths(settings, sampling, max_model_len, where, **fields)
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


def checked_model_settings(model_dir: str, prompt: RerankPromptSection, eos_token: str,
                           sampling: RerankSamplingSection, max_model_len: int, where: str, *,
                           prompt_field: str = "prompt", **fields) -> RerankSettings:
    """A reader's start-up check (evaluation, serving, RL): the checkpoint's settings (`load_model_settings`; the
    reader's `prompt` section, at `prompt_field`, when it has no gr2_rerank.json), refused with a ConfigError naming
    both fields when the reader's `sampling` / `max_model_len` contradict them (`check_lengths`; `fields`:
    sampling_field, engine_field, candidates)."""
    settings = load_model_settings(model_dir, prompt, eos_token, config=where, prompt_field=prompt_field)
    return require_lengths(settings, sampling, max_model_len, where, **fields)


def trained_lengths(teacher: RerankSamplingSection | None, longest_answer_tokens: int | None = None,
                    longest_prompt_tokens: int | None = None, max_len: int | None = None,
                    candidates: int = DEFAULT_CANDIDATES) -> RerankLengths:
    """The lengths a model trained on answers sampled with `teacher` (the traces stage's sampling; None when
    unknown) is saved with: unconstrained, the teacher's max_tokens is the budget (an answer could be that long);
    constrained, the longest answer trained on, or the format's estimate when none was measured.

    >>> trained_lengths(RerankSamplingSection(max_tokens=2048), longest_answer_tokens=1800).max_answer_tokens
    2048
    """
    if teacher is None:
        budget = longest_answer_tokens
    elif teacher.constrained:
        budget = longest_answer_tokens or answer_token_budget(teacher, candidates)
    else:
        budget = max(teacher.max_tokens, longest_answer_tokens or 0)
    if budget is None:
        raise ValueError("trained_lengths needs the teacher's sampling or the longest answer trained on")
    return RerankLengths(
        max_answer_tokens=budget, longest_answer_tokens=longest_answer_tokens,
        longest_prompt_tokens=longest_prompt_tokens, teacher_max_tokens=teacher.max_tokens if teacher else None,
        constrained=teacher.constrained if teacher else None,
        max_explanation_tokens=teacher.max_explanation_tokens if teacher and teacher.constrained else None,
        max_len=max_len)


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

    def messages(self, history: Sequence[int], candidates: Sequence[int], target: int | None = None) -> list[dict]:
        s = self.section
        return build_messages(
            [self.item(i) for i in history], [self.item(i) for i in candidates],
            target=self.item(target) if target is not None else None, priming=s.priming,
            count_tokens=self.count_tokens, history_token_budget=s.history_token_budget,
            max_title_chars=s.max_title_chars,
        )

    def prompt(self, history: Sequence[int], candidates: Sequence[int], target: int | None = None) -> tuple[str, list[int]]:
        """(chat text up to the assistant turn, its token ids)."""
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
