"""SFT examples for the re-ranker: the re-rank prompt (no target) -> the teacher's accepted answer.

The loss is on the assistant turn only, with per-token weights: reasoning tokens (the `<think>` block's text and
the JSON `explanation` string) weigh `lambda_reasoning`, everything else of the answer (the ranking, the JSON
around it, the end-of-turn token) weighs `lambda_ranking`, as the GR2 paper weights reasoning below the ranking.

>>> segments = answer_segments('{"explanation": "likes red", "recommendations": ["<|sid_begin|><s_a_1><|sid_end|>"]}')
>>> [(text, reasoning) for text, reasoning in segments]
[('{"explanation": "', False), ('likes red', True), ('", "recommendations": ["<|sid_begin|><s_a_1><|sid_end|>"]}', False)]
>>> answer_segments('<think>\\nhmm\\n</think>\\n\\n{"recommendations": []}')[:3]
[('<think>', False), ('\\nhmm\\n', True), ('</think>\\n\\n{"recommendations": []}', False)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rec.rerank import THINK_END, THINK_START

IGNORE_INDEX = -100
_EXPLANATION = re.compile(r'"explanation"\s*:\s*"')


def _string_end(text: str, start: int) -> int:
    """Index of the quote that closes the JSON string whose content starts at `start` (len(text) if none)."""
    escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return index
    return len(text)


def answer_segments(text: str) -> list[tuple[str, bool]]:
    """The answer cut into (text, is_reasoning) pieces, in order; their concatenation is `text`."""
    segments: list[tuple[str, bool]] = []
    rest = text
    end = rest.find(THINK_END)
    start = rest.find(THINK_START)
    if 0 <= start < end:
        body = start + len(THINK_START)
        segments += [(rest[:body], False), (rest[body:end], True)]
        rest = rest[end:]
    match = _EXPLANATION.search(rest)
    if match:
        close = _string_end(rest, match.end())
        segments += [(rest[: match.end()], False), (rest[match.end():close], True), (rest[close:], False)]
    else:
        segments.append((rest, False))
    return [(piece, reasoning) for piece, reasoning in segments if piece]


def promoted_ranking(shown: Sequence[int], target: int) -> list[int]:
    """The `promoted` SFT answer: the candidates in the order the prompt shows them, the target moved to the front.

    >>> promoted_ranking([4, 7, 9, 2], 9)
    [9, 4, 7, 2]
    """
    if target not in shown:
        raise ValueError(f"target {target} is not among the candidates {list(shown)}")
    return [target] + [item for item in shown if item != target]


@dataclass
class SftExample:
    input_ids: list[int]
    labels: list[int]
    weights: list[float]

    @property
    def loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def build_example(
    tokenizer, prompt_ids: Sequence[int], answer: str, eos_id: int, lambda_reasoning: float, lambda_ranking: float
) -> SftExample:
    """prompt + answer + eos; labels and weights cover exactly the answer and the eos."""
    answer_ids: list[int] = []
    weights: list[float] = []
    for piece, reasoning in answer_segments(answer):
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        answer_ids += ids
        weights += [lambda_reasoning if reasoning else lambda_ranking] * len(ids)
    answer_ids.append(eos_id)
    weights.append(lambda_ranking)
    prompt_ids = list(prompt_ids)
    return SftExample(
        input_ids=prompt_ids + answer_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        weights=[0.0] * len(prompt_ids) + weights,
    )


def collate(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Ray Data numpy batch (or list of dicts) of examples -> right-padded tensors with attention mask."""
    if isinstance(rows, dict):
        rows = [{key: rows[key][i] for key in rows} for i in range(len(rows["input_ids"]))]
    width = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": np.full((len(rows), width), pad_id, dtype=np.int64),
        "attention_mask": np.zeros((len(rows), width), dtype=np.int64),
        "labels": np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64),
        "weights": np.zeros((len(rows), width), dtype=np.float32),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = row["input_ids"]
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = row["labels"]
        batch["weights"][i, :n] = row["weights"]
    return {key: torch.from_numpy(value) for key, value in batch.items()}


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-token weighted next-token cross-entropy, averaged over the answer tokens (the weights scale, not
    renormalise, so lambda_reasoning < 1 really lowers the pull of reasoning tokens).

    >>> logits = torch.zeros(1, 3, 4); labels = torch.tensor([[-100, 1, 2]])
    >>> round(float(weighted_lm_loss(logits, labels, torch.tensor([[0.0, 1.0, 0.5]]))), 4)  # (ln4 + ln4 / 2) / 2
    1.0397
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    shift_weights = weights[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    counted = shift_labels != IGNORE_INDEX
    return (losses * shift_weights * counted).sum() / counted.sum().clamp(min=1)
