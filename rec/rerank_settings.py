"""What a re-ranker checkpoint was trained with, saved next to its weights in `gr2_rerank.json` (prompt section,
eos token, length budgets), and the checks every reader (evaluation, RL, serving, `python -m pipelines.check`) runs
against its own config: one source of truth for lengths, so no later stage cuts the answers the model learned to
write. Pure: no Ray or vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import Field, ValidationError

from rec.config import ConfigError, Section
from rec.rerank import RerankPromptSection, RerankSamplingSection

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
