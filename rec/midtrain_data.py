"""Mid-training data: a weighted mixture of SID tasks, tokenised, with the loss on answer tokens only.

Tasks (each example is a token id list plus a label list, -100 where no loss is taken):

- `next_item`: ONE causal sequence per user, `Purchase history:` followed by the SIDs of the user's train-split
  items in order. Every item after the first `min_history` is a target given the items before it, so one forward
  pass covers every prefix. Users longer than `max_len` are cut into overlapping chunks; an item is a target in
  exactly one chunk. Only `data/train.parquet` is read, which already excludes each user's valid and test items.
- `sid_to_text`: `Item <sid> is:` -> the item text, then `<|endoftext|>`.
- `text_to_sid`: `Item: <text>` / `Semantic ID:` -> the SID, then `<|endoftext|>`.

The mixture weight of a task is how many passes over that task's examples one mixture epoch holds (0 drops the
task, 0.5 takes a seeded random half, 2 repeats it twice). Examples are then shuffled and either packed into rows
of `seq_len` tokens or kept one per row; `collate` pads a batch of rows. Everything is plain python/numpy/torch.

Packed rows never leak across examples (`PACKING_FORMAT`): every row carries `position_ids` that restart at 0 at
each example (padding is one more run from 0), the first label of each example is masked (otherwise the loss
shift would predict it from the previous example's last token), and `model_inputs` gives the model those
positions with `attention_mask=None` and `use_cache=False`. transformers' `masking_utils` (read in 5.19) then
detects the packed runs (`find_packed_sequence_indices`) and builds a block-diagonal causal mask for sdpa, eager
and flex attention: the CPU path (fp32) and the bf16 GPU presets, which run sdpa too (no preset sets
`attn_implementation`), under any ZeRO stage (DeepSpeed passes the keyword arguments through). The mask is
[batch, 1, T, T] booleans, 4 MiB per 2048-token row. Flash-attention kernels take no mask, so for them
`model_inputs` adds the varlen boundaries (`cu_seq_lens_q/k` over the flattened batch, which transformers' own
padding-free path infers from positions only at batch size 1). Why not a hand-made 4-D mask: flash kernels cannot
take one, and this way one description of the rows serves every kernel. A 2-D padding mask or a cache (which the
model creates when `use_cache` is on, in training too) switches the packed detection off, silently. Each example's
logits are then those of the example alone (tests/test_midtrain_data.py checks sdpa and eager to 1e-5 in fp32).

The pre-ranker must prompt exactly as `next_item` trains: use `next_item_prompt_ids`, then decode
`<|sid_begin|>` and one code per level.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rec.model import ENDOFTEXT, SidCodeTables, encode_text, encode_texts, sid_token_ids, token_id
from rec.sid.codes import SID_BEGIN, SID_END

IGNORE_INDEX = -100
TASKS = ("next_item", "sid_to_text", "text_to_sid")
NEXT_ITEM_PREFIX = "Purchase history:"
SID_TO_TEXT_PROMPT = ("Item ", " is: ")
TEXT_TO_SID_PROMPT = ("Item: ", "\nSemantic ID: ")
PACKING_FORMAT = 2
"""Version of the packed-row format, part of the midtrain fingerprint. 1: every token attended to the earlier
examples of its row. 2: positions and attention restart at each example, and each example's first label is masked."""


@dataclass(frozen=True)
class Example:
    task: str
    source: int
    """The user id (next_item) or item id (the text tasks) the example was made from."""
    input_ids: list[int]
    labels: list[int]


class SidEncoder:
    """Token ids of SIDs and prompt pieces for one tokenizer and one SID map."""

    def __init__(self, tokenizer, item_ids: Sequence[int], codes: np.ndarray, codebook_size: int):
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or len(codes) != len(item_ids):
            raise ValueError(f"codes must be [items, levels] matching item_ids; got {codes.shape}, {len(item_ids)}")
        self.levels = int(codes.shape[1])
        self.codebook_size = codebook_size
        code_ids = sid_token_ids(tokenizer, self.levels, codebook_size).numpy()
        self.sid_begin = token_id(tokenizer, SID_BEGIN)
        self.sid_end = token_id(tokenizer, SID_END)
        self.end_of_text = token_id(tokenizer, ENDOFTEXT)
        # [items, levels + 2] token ids of every item's SID, markers included
        body = code_ids[np.arange(self.levels)[None, :], codes]
        ends = np.full((len(codes), 1), self.sid_begin), np.full((len(codes), 1), self.sid_end)
        self.sid_tokens = np.concatenate([ends[0], body, ends[1]], axis=1)
        self.row_of = {int(item): row for row, item in enumerate(item_ids)}
        self.next_item_prefix = encode_text(tokenizer, NEXT_ITEM_PREFIX)
        self._tokenizer = tokenizer

    @property
    def sid_len(self) -> int:
        return self.levels + 2

    def sid_ids(self, item_id: int) -> list[int]:
        try:
            return self.sid_tokens[self.row_of[int(item_id)]].tolist()
        except KeyError:
            raise KeyError(f"item {item_id} has no SID in sid/sid_map.parquet; rerun the sid stage") from None

    def max_items(self, max_len: int) -> int:
        """Most items whose SIDs fit in one next-item sequence of `max_len` tokens."""
        return (max_len - len(self.next_item_prefix)) // self.sid_len


def next_item_prompt_ids(encoder: SidEncoder, history: Sequence[int], max_len: int | None = None) -> list[int]:
    """The pre-ranking prompt: the next-item prefix and the history's SIDs (the most recent that fit `max_len`).

    The model's next tokens are `<|sid_begin|>` and one code per level, as in `next_item` training.
    """
    if max_len is not None:
        keep = encoder.max_items(max_len - encoder.sid_len)
        history = list(history)[-keep:] if keep > 0 else []
    ids = list(encoder.next_item_prefix)
    for item in history:
        ids.extend(encoder.sid_ids(item))
    return ids


def next_item_examples(
    encoder: SidEncoder, users: Iterable[tuple[int, Sequence[int]]], max_len: int, min_history: int = 1,
    markers: bool = True,
) -> list[Example]:
    """One causal sequence per user (chunked when longer than `max_len`); each item is a target exactly once.

    Chunks after the first repeat up to half a chunk of earlier items as unlabelled context. With `markers` false a
    target's `<|sid_begin|>` and `<|sid_end|>` are inputs but not labels: the pre-ranker's beam search forces both
    (`rec.beam` appends `<|sid_begin|>` to the prompt and the trie ends every SID), so only the codes are ever
    scored, and the markers' full-vocabulary head is a third of a 4-level next-item example's labels.
    """
    max_items = encoder.max_items(max_len)
    if max_items < 2:
        raise ValueError(f"max_len={max_len} fits {max_items} SIDs; next-item prediction needs at least 2")
    context = max_items // 2
    examples = []
    for user_id, items in users:
        items = list(items)
        first_target = min(min_history, len(items))
        start = 0
        while first_target < len(items):
            end = min(start + max_items, len(items))
            input_ids = list(encoder.next_item_prefix)
            labels = [IGNORE_INDEX] * len(input_ids)
            for position in range(start, end):
                sid = encoder.sid_ids(items[position])
                input_ids.extend(sid)
                if position < first_target:
                    labels.extend([IGNORE_INDEX] * len(sid))
                else:
                    labels.extend(sid if markers else [IGNORE_INDEX, *sid[1:-1], IGNORE_INDEX])
            examples.append(Example("next_item", int(user_id), input_ids, labels))
            first_target = end
            start = max(end - context, start + 1)
    return examples


def held_out_examples(
    encoder: SidEncoder, rows: Iterable[tuple[int, Sequence[int], int]], max_len: int
) -> list[Example]:
    """One example per (user_id, history, target) of a held-out split (data/valid.parquet): the pre-ranking prompt
    (`next_item_prompt_ids`, the most recent history that fits) followed by the target's SID, whose codes are the only
    labels (the beam search forces both markers). Its mean loss is the per-code negative log-likelihood of the held-out
    target, the quantity the beam search ranks by, whatever `next_item_markers` the training rows use."""
    examples = []
    for user_id, history, target in rows:
        prompt = next_item_prompt_ids(encoder, history, max_len)  # leaves room for the target's SID
        sid = encoder.sid_ids(target)
        examples.append(Example("held_out", int(user_id), prompt + sid,
                                [IGNORE_INDEX] * (len(prompt) + 1) + sid[1:-1] + [IGNORE_INDEX]))
    return examples


def _truncate(ids: list[int], max_tokens: int) -> list[int]:
    return ids[:max_tokens]


def sid_text_examples(
    tokenizer, encoder: SidEncoder, item_ids: Sequence[int], texts: Sequence[str], max_text_tokens: int
) -> dict[str, list[Example]]:
    """`sid_to_text` and `text_to_sid` examples for every item (text cut to `max_text_tokens`)."""
    text_ids = [_truncate(ids, max_text_tokens) for ids in encode_texts(tokenizer, list(texts))]
    a1, a2 = (encode_text(tokenizer, part) for part in SID_TO_TEXT_PROMPT)
    b1, b2 = (encode_text(tokenizer, part) for part in TEXT_TO_SID_PROMPT)
    eot = [encoder.end_of_text]
    sid_to_text, text_to_sid = [], []
    for item_id, text in zip(item_ids, text_ids):
        sid = encoder.sid_ids(item_id)
        prompt = a1 + sid + a2
        answer = text + eot
        sid_to_text.append(Example("sid_to_text", int(item_id), prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
        prompt = b1 + text + b2
        answer = sid + eot
        text_to_sid.append(Example("text_to_sid", int(item_id), prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return {"sid_to_text": sid_to_text, "text_to_sid": text_to_sid}


def build_task_examples(
    tokenizer,
    items: Mapping[str, Sequence[Any]],
    sid_map: Mapping[str, Sequence[Any]],
    train: Mapping[str, Sequence[Any]],
    codebook_size: int,
    max_len: int,
    max_text_tokens: int,
    min_history: int = 1,
    next_item_markers: bool = True,
) -> dict[str, list[Example]]:
    """Every task's examples from column dicts of data/items, sid/sid_map and data/train (`Table.to_pydict()`)."""
    encoder = SidEncoder(tokenizer, sid_map["item_id"], np.array(list(sid_map["codes"])), codebook_size)
    users = zip(train["user_id"], train["item_ids"])
    tasks = {"next_item": next_item_examples(encoder, users, max_len, min_history, markers=next_item_markers)}
    tasks.update(sid_text_examples(tokenizer, encoder, items["item_id"], items["text"], max_text_tokens))
    return tasks


def mix(tasks: Mapping[str, list[Example]], weights: Mapping[str, float], seed: int) -> list[Example]:
    """A shuffled mixture: `weights[task]` passes over each task's examples (fractions are seeded subsets)."""
    unknown = set(weights) - set(tasks)
    if unknown:
        raise ValueError(f"mixture weights name unknown tasks {sorted(unknown)}; known: {sorted(tasks)}")
    rng = np.random.default_rng(seed)
    mixture: list[Example] = []
    for task, examples in tasks.items():
        weight = float(weights.get(task, 0.0))
        if weight < 0:
            raise ValueError(f"mixture weight of {task!r} must be >= 0, got {weight}")
        whole, fraction = int(weight), weight - int(weight)
        mixture.extend(examples * whole)
        if fraction > 0 and examples:
            chosen = rng.choice(len(examples), size=int(round(fraction * len(examples))), replace=False)
            mixture.extend(examples[i] for i in np.sort(chosen))
    order = rng.permutation(len(mixture))
    return [mixture[i] for i in order]


def pack(examples: Iterable[Example], seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate examples in order into rows of at most `seq_len` tokens (an example is never split).

    Each row's `position_ids` restart at 0 at every example, which keeps examples apart in attention (module
    docstring), and each example's first label is masked: alone it is never predicted (nothing comes before it),
    packed it would be predicted from the previous example's last token. Examples longer than `seq_len` are an
    error: chunk or truncate them first (`max_len`, `max_text_tokens`).
    """
    rows: list[dict[str, list[int]]] = []
    row = _empty_row()
    for example in examples:
        if len(example.input_ids) > seq_len:
            raise ValueError(
                f"{example.task} example from {example.source} has {len(example.input_ids)} tokens > seq_len "
                f"{seq_len}; lower max_len / max_text_tokens or raise seq_len"
            )
        if len(row["input_ids"]) + len(example.input_ids) > seq_len:
            rows.append(row)
            row = _empty_row()
        row["input_ids"].extend(example.input_ids)
        row["labels"].extend([IGNORE_INDEX, *example.labels[1:]] if example.labels else [])
        row["position_ids"].extend(range(len(example.input_ids)))
    if row["input_ids"]:
        rows.append(row)
    return rows


def _empty_row() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "position_ids": []}


def unpacked(examples: Iterable[Example]) -> list[dict[str, list[int]]]:
    """One row per example (for padded batches)."""
    return [
        {"input_ids": e.input_ids, "labels": e.labels, "position_ids": list(range(len(e.input_ids)))} for e in examples
    ]


def collate(rows: Mapping[str, Any] | Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad rows to the longest: input_ids (pad_id), labels (-100), position_ids, attention_mask (0 on padding).

    The padding of a row gets positions 0, 1, ... of its own, so it is one more packed run that no real token
    attends to (`model_inputs` passes no attention_mask: the mask counts tokens). A row without `position_ids` is
    one example (0 .. n-1). Accepts a list of row dicts or a Ray Data numpy batch (a dict of columns).
    """
    if isinstance(rows, Mapping):
        columns = rows
        names = [name for name in ("input_ids", "labels", "position_ids") if name in columns]
        rows = [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.from_numpy(np.array(row["input_ids"], dtype=np.int64))
        labels[i, :n] = torch.from_numpy(np.array(row["labels"], dtype=np.int64))
        positions = row.get("position_ids")
        position_ids[i, :n] = torch.arange(n) if positions is None else torch.from_numpy(np.array(positions, np.int64))
        position_ids[i, n:] = torch.arange(width - n)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


def model_inputs(batch: Mapping[str, torch.Tensor], attn_implementation: str | None = "sdpa") -> dict[str, Any]:
    """The model's keyword arguments for a collated batch: each packed example attends only to itself.

    `attention_mask` is left out and `use_cache` is off on purpose: transformers builds the block-diagonal mask from
    `position_ids` only when there is neither (module docstring). Flash-attention implementations also get the
    varlen boundaries of every packed run of the flattened batch.
    """
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": batch["labels"],
              "use_cache": False}
    if attn_implementation is not None and "flash" in attn_implementation:
        inputs.update(flash_varlen_kwargs(batch["position_ids"]))
    return inputs


def loss_on_labels(model, inputs: dict[str, Any], sid_codes: SidCodeTables | None = None) -> torch.Tensor:
    """The causal-LM loss of `model(**inputs)` (mean next-token cross-entropy over the label tokens), with the LM head
    applied only where a label is (`rec.model.logits_at_labels`): the same loss as the HF forward's, at a fraction
    of its cost when few tokens are labels.

    With `sid_codes` (the code tables of the SID tokens, `rec.model.SidCodeTables`; the `level` SID softmax) a label
    that is a level-l code is scored against level l's codes only, and every other label (text, `<|sid_begin|>`,
    `<|sid_end|>`) against the full vocabulary. That is the distribution the trie-constrained beam search decodes
    from when the model's `sid_softmax` is `level` (`rec.beam`): at a code position only that level's codes are
    ever allowed, so the mass of the other ~9k tokens there is never used; and the head costs codebook_size columns
    there instead of the vocabulary (next-item examples label ~74 % of their tokens; with 4 levels, 4 of every 6 labels are codes)."""
    import torch.nn.functional as F

    from rec.model import logits_at_labels

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    if sid_codes is None:
        logits, targets, _ = logits_at_labels(model, labels, **inputs)
        if logits is None:
            return targets  # no label in the batch: a zero loss that still reaches every parameter
        return F.cross_entropy(logits.float(), targets)
    hidden = model.model(**inputs).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        return hidden.sum() * 0.0
    hidden, targets = hidden[keep], targets[keep]
    head = model.lm_head
    if sid_codes.ids.device != targets.device:
        sid_codes = sid_codes.to(targets.device)
    levels = sid_codes.level[targets]  # per label: its level, -1 where it is not a code
    total = hidden.new_zeros((), dtype=torch.float32)
    rest = levels < 0
    if bool(rest.any()):
        total = total + F.cross_entropy(head(hidden[rest]).float(), targets[rest], reduction="sum")
    for level, ids in enumerate(sid_codes.ids):
        at = levels == level
        if bool(at.any()):
            logits = F.linear(hidden[at], head.weight[ids], head.bias[ids] if head.bias is not None else None)
            total = total + F.cross_entropy(logits.float(), sid_codes.code[targets[at]], reduction="sum")
    return total / len(targets)


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """`cu_seq_lens_q/k` and `max_length_q/k` of the runs of `position_ids` (a run starts at 0), over the flattened
    batch, as transformers' `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` gives them."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    cu_seq_lens = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int(cu_seq_lens.diff().max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest, "max_length_k": longest}


def mixture_stats(examples: Sequence[Example]) -> dict[str, dict[str, int]]:
    """Examples, tokens and loss tokens per task (for the stage's log and report)."""
    stats: dict[str, dict[str, int]] = {}
    for example in examples:
        entry = stats.setdefault(example.task, {"examples": 0, "tokens": 0, "loss_tokens": 0})
        entry["examples"] += 1
        entry["tokens"] += len(example.input_ids)
        entry["loss_tokens"] += sum(1 for label in example.labels if label != IGNORE_INDEX)
    return stats


def tokenizer_corpus(texts: Iterable[str]) -> Iterable[str]:
    """Text the tiny tokenizer is trained on: the prompt templates, then every item text."""
    yield NEXT_ITEM_PREFIX
    yield "".join(SID_TO_TEXT_PROMPT)
    yield "".join(TEXT_TO_SID_PROMPT)
    yield from texts
