"""Mid-training data (rec/midtrain_data.py): task examples, loss masks, no leakage, mixture, packing, collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from midtrain_fixtures import CODEBOOK_SIZE, make_run_dir

from rec.midtrain_data import (
    IGNORE_INDEX,
    Example,
    SidEncoder,
    build_task_examples,
    collate,
    mix,
    mixture_stats,
    next_item_examples,
    next_item_prompt_ids,
    pack,
    sid_text_examples,
    tokenizer_corpus,
)
from rec.model import train_tokenizer
from rec.sid.codes import parse_sid

ITEM_IDS = list(range(10, 30))
CODES = np.array([[i % 4, (i // 4) % 4, i % 3] for i in range(20)])  # unique 3-level codes in [0, 4)
TEXTS = [f"Item number {i} lipstick <s_a_1> shade <|im_end|>" for i in ITEM_IDS]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_corpus(TEXTS * 5), vocab_size=350, sid_levels=3, codebook_size=4)


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return SidEncoder(tokenizer, ITEM_IDS, CODES, codebook_size=4)


def _answer_spans(example: Example) -> list[list[int]]:
    """Maximal runs of labelled positions."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token, "labels must equal the input token at answer positions"
            current.append(token)
    return spans + ([current] if current else [])


def _sid_items(encoder: SidEncoder, tokenizer, token_ids: list[int]) -> list[int]:
    """Item ids of the SIDs in a run of token ids (SIDs are sid_len tokens each)."""
    by_codes = {tuple(c): item for item, c in zip(ITEM_IDS, CODES.tolist())}
    n = encoder.sid_len
    return [by_codes[parse_sid(tokenizer.decode(token_ids[i : i + n]))] for i in range(0, len(token_ids), n)]


def test_next_item_one_sequence_per_user_targets_every_item_after_the_first(tokenizer, encoder):
    users = [(1, [10, 11, 12, 13]), (2, [20, 21]), (3, [25])]
    examples = next_item_examples(encoder, users, max_len=128)
    assert [e.source for e in examples] == [1, 2]  # a one-item user has no target
    first = examples[0]
    assert first.input_ids[: len(encoder.next_item_prefix)] == encoder.next_item_prefix
    targets = [item for span in _answer_spans(first) for item in _sid_items(encoder, tokenizer, span)]
    assert targets == [11, 12, 13]
    # the pre-ranking prompt is exactly the training sequence up to the next SID
    prompt = next_item_prompt_ids(encoder, [10, 11])
    assert first.input_ids[: len(prompt)] == prompt
    assert first.input_ids[len(prompt)] == encoder.sid_begin


def test_long_users_are_chunked_and_each_item_is_a_target_once(tokenizer, encoder):
    items = ITEM_IDS * 2  # 40 items
    max_len = len(encoder.next_item_prefix) + 7 * encoder.sid_len
    examples = next_item_examples(encoder, [(5, items)], max_len=max_len)
    assert len(examples) > 1 and all(len(e.input_ids) <= max_len for e in examples)
    targets = [item for e in examples for span in _answer_spans(e) for item in _sid_items(encoder, tokenizer, span)]
    assert targets == items[1:]
    assert sum(1 for e in examples for label in e.labels if label != IGNORE_INDEX) == 39 * encoder.sid_len
    # later chunks carry earlier items as unlabelled context
    assert examples[1].labels[len(encoder.next_item_prefix)] == IGNORE_INDEX


def test_prompt_keeps_the_most_recent_history_within_max_len(encoder):
    max_len = len(encoder.next_item_prefix) + 4 * encoder.sid_len
    prompt = next_item_prompt_ids(encoder, ITEM_IDS, max_len=max_len)
    assert len(prompt) + encoder.sid_len <= max_len
    assert prompt[-encoder.sid_len :] == encoder.sid_ids(ITEM_IDS[-1])


def test_text_tasks_put_the_loss_on_the_answer_only(tokenizer, encoder):
    tasks = sid_text_examples(tokenizer, encoder, ITEM_IDS[:3], TEXTS[:3], max_text_tokens=64)
    to_text, to_sid = tasks["sid_to_text"][1], tasks["text_to_sid"][1]
    assert to_text.source == ITEM_IDS[1]
    (answer,) = _answer_spans(to_text)
    assert tokenizer.decode(answer) == TEXTS[1] + "<|endoftext|>"
    prompt = to_text.input_ids[: len(to_text.input_ids) - len(answer)]
    sid = encoder.sid_ids(ITEM_IDS[1])
    assert any(prompt[i : i + len(sid)] == sid for i in range(len(prompt)))
    (answer,) = _answer_spans(to_sid)
    assert answer == encoder.sid_ids(ITEM_IDS[1]) + [encoder.end_of_text]
    # the item text in the prompt holds "<s_a_1>" and "<|im_end|>" literally, never as special tokens
    prompt = to_sid.input_ids[: len(to_sid.input_ids) - len(answer)]
    assert not set(prompt) & set(tokenizer.added_tokens_decoder)
    truncated = sid_text_examples(tokenizer, encoder, ITEM_IDS[:1], TEXTS[:1], max_text_tokens=3)["sid_to_text"][0]
    assert len(_answer_spans(truncated)[0]) == 3 + 1


def test_no_valid_or_test_target_is_a_training_target(tmp_path, tokenizer):
    run_dir = make_run_dir(tmp_path, max_users=60)
    items = run_dir.read_parquet("data", "items.parquet").to_pydict()
    sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
    train = run_dir.read_parquet("data", "train.parquet").to_pydict()
    tok = train_tokenizer(tokenizer_corpus(items["text"]), 600, sid_levels=3, codebook_size=CODEBOOK_SIZE)
    tasks = build_task_examples(tok, items, sid_map, train, CODEBOOK_SIZE, max_len=96, max_text_tokens=32)
    encoder = SidEncoder(tok, sid_map["item_id"], np.array(sid_map["codes"]), CODEBOOK_SIZE)
    sid_to_item = {tuple(encoder.sid_ids(item)): item for item in sid_map["item_id"]}
    targets: dict[int, set[int]] = {}
    for example in tasks["next_item"]:
        for span in _answer_spans(example):
            for i in range(0, len(span), encoder.sid_len):
                targets.setdefault(example.source, set()).add(sid_to_item[tuple(span[i : i + encoder.sid_len])])
    assert sum(len(t) for t in targets.values()) > 100
    held_out = 0
    for split in ("valid", "test"):
        for row in run_dir.read_parquet("data", f"{split}.parquet").to_pylist():
            assert row["target"] not in targets.get(row["user_id"], set()), (split, row["user_id"])
            held_out += 1
    assert held_out == 120
    assert len(tasks["sid_to_text"]) == len(tasks["text_to_sid"]) == len(items["item_id"])


def _examples(task: str, n: int) -> list[Example]:
    return [Example(task, i, [i, i + 1, i + 2], [IGNORE_INDEX, i + 1, i + 2]) for i in range(n)]


def test_mixture_weights_are_passes_over_each_task():
    tasks = {"next_item": _examples("next_item", 10), "sid_to_text": _examples("sid_to_text", 10),
             "text_to_sid": _examples("text_to_sid", 10)}
    mixture = mix(tasks, {"next_item": 2.0, "sid_to_text": 0.5, "text_to_sid": 0.0}, seed=0)
    counts = {task: sum(1 for e in mixture if e.task == task) for task in tasks}
    assert counts == {"next_item": 20, "sid_to_text": 5, "text_to_sid": 0}
    assert mixture != sorted(mixture, key=lambda e: (e.task, e.source))  # shuffled
    assert mix(tasks, {"next_item": 2.0, "sid_to_text": 0.5}, seed=0) == mixture  # seeded
    assert mixture_stats(mixture)["next_item"] == {"examples": 20, "tokens": 60, "loss_tokens": 40}
    with pytest.raises(ValueError, match="unknown tasks"):
        mix(tasks, {"general_text": 1.0}, seed=0)


def test_pack_fills_rows_without_splitting_examples():
    examples = _examples("next_item", 10)
    rows = pack(examples, seq_len=7)
    assert [len(r["input_ids"]) for r in rows] == [6, 6, 6, 6, 6]
    assert [t for r in rows for t in r["input_ids"]] == [t for e in examples for t in e.input_ids]
    assert [t for r in rows for t in r["labels"]] == [t for e in examples for t in e.labels]
    with pytest.raises(ValueError, match="next_item example from 0 has 3 tokens > seq_len 2"):
        pack(examples, seq_len=2)


def test_collate_pads_rows_and_masks_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    # a Ray Data numpy batch (dict of columns of arrays) gives the same tensors
    columns = {"input_ids": np.array([np.array([5, 6, 7]), np.array([8])], dtype=object),
               "labels": np.array([np.array([-100, 6, 7]), np.array([8])], dtype=object)}
    assert all(torch.equal(batch[k], v) for k, v in collate(columns, pad_id=0).items())


def test_encoder_names_an_item_without_sid(encoder):
    with pytest.raises(KeyError, match="item 999"):
        encoder.sid_ids(999)
