"""Mid-training data (rec/midtrain_data.py): task examples, loss masks, no leakage, mixture, packing, collate.

Packing is checked on a real config-built Qwen3 (fp32): an example's logits and loss are the same packed between
other examples as alone, through the keyword arguments the midtrain loss gives the model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from midtrain_fixtures import CODEBOOK_SIZE, make_run_dir
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from pipelines.midtrain import causal_lm_loss
from rec.midtrain_data import (
    IGNORE_INDEX,
    Example,
    SidEncoder,
    build_task_examples,
    collate,
    held_out_examples,
    loss_on_labels,
    mix,
    mixture_stats,
    model_inputs,
    next_item_examples,
    next_item_prompt_ids,
    pack,
    sid_text_examples,
    tokenizer_corpus,
    unpacked,
)
from rec.model import ModelSection, SidCodeTables, build_tiny_model, sid_token_ids, train_tokenizer
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


def test_without_markers_only_the_codes_of_each_target_are_labels(tokenizer, encoder):
    users = [(1, [10, 11, 12, 13]), (2, [20, 21])]
    with_markers = next_item_examples(encoder, users, max_len=128)
    codes_only = next_item_examples(encoder, users, max_len=128, markers=False)
    code_ids = set(sid_token_ids(tokenizer, 3, 4).view(-1).tolist())
    for full, codes in zip(with_markers, codes_only):
        assert codes.input_ids == full.input_ids  # the markers stay in the input
        for token, label_full, label_codes in zip(full.input_ids, full.labels, codes.labels):
            if token in code_ids:
                assert label_codes == label_full
            else:
                assert label_codes == IGNORE_INDEX
    # three targets of user 1, one of user 2: `levels` code labels each, no marker
    assert [sum(label != IGNORE_INDEX for label in e.labels) for e in codes_only] == [3 * 3, 1 * 3]
    assert [sum(label == encoder.sid_begin for label in e.labels) for e in with_markers] == [3, 1]


def test_held_out_examples_score_only_the_targets_codes_after_the_pre_ranking_prompt(tokenizer, encoder):
    max_len = len(encoder.next_item_prefix) + 4 * encoder.sid_len
    rows = [(1, ITEM_IDS[:6], ITEM_IDS[7]), (2, [], ITEM_IDS[0])]
    long, empty = held_out_examples(encoder, rows, max_len)
    code_ids = set(sid_token_ids(tokenizer, 3, 4).view(-1).tolist())
    for example, (user, history, target) in zip((long, empty), rows):
        prompt = next_item_prompt_ids(encoder, history, max_len)
        assert example.source == user and len(example.input_ids) <= max_len
        assert example.input_ids == prompt + encoder.sid_ids(target)  # the pre-ranker's prompt, then the target
        assert _answer_spans(example) == [encoder.sid_ids(target)[1:-1]]  # its codes only, no marker
        assert set(_answer_spans(example)[0]) <= code_ids
    assert _sid_items(encoder, tokenizer, long.input_ids[len(encoder.next_item_prefix):]) == ITEM_IDS[3:6] + [ITEM_IDS[7]]


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
    examples[3] = Example("next_item", 3, [3, 4, 5], [3, 4, 5])  # a label at its first token: nothing predicts it
    rows = pack(examples, seq_len=7)
    assert [len(r["input_ids"]) for r in rows] == [6, 6, 6, 6, 6]
    assert [t for r in rows for t in r["input_ids"]] == [t for e in examples for t in e.input_ids]
    assert all(r["position_ids"] == [0, 1, 2, 0, 1, 2] for r in rows)
    # every loss target of every example is kept; an example's first token is never a target packed
    assert [t for r in rows for t in r["labels"]] == [t for e in examples for t in [IGNORE_INDEX, *e.labels[1:]]]
    with pytest.raises(ValueError, match="next_item example from 0 has 3 tokens > seq_len 2"):
        pack(examples, seq_len=2)


def test_collate_pads_rows_and_masks_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]  # the padding is a run of its own
    # a Ray Data numpy batch (dict of columns of arrays) gives the same tensors, position_ids included
    columns = {"input_ids": np.array([np.array([5, 6, 7]), np.array([8])], dtype=object),
               "labels": np.array([np.array([-100, 6, 7]), np.array([8])], dtype=object),
               "position_ids": np.array([np.array([0, 1, 2]), np.array([0])], dtype=object)}
    assert all(torch.equal(batch[k], v) for k, v in collate(columns, pad_id=0).items())
    packed = collate(pack(_examples("next_item", 2), seq_len=6) + [{"input_ids": [1], "labels": [1]}], pad_id=0)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 0, 1, 2, 3, 4]]


VOCAB = 64


@pytest.fixture(scope="module")
def small_model():
    dims = ModelSection(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)
    return build_tiny_model(dims, VOCAB, seed=0).eval()


def _random_example(rng: np.random.Generator, length: int, first_label: int) -> Example:
    ids = rng.integers(1, VOCAB, size=length).tolist()
    return Example("next_item", length, ids, [IGNORE_INDEX] * first_label + ids[first_label:])


@pytest.fixture(scope="module")
def packed_examples() -> tuple[list[Example], dict[str, torch.Tensor]]:
    """Three examples packed into one row (the middle one labelled from its very first token) and, in a second row,
    the middle one alone unpacked and padded."""
    rng = np.random.default_rng(0)
    examples = [_random_example(rng, 5, 2), _random_example(rng, 9, 0), _random_example(rng, 6, 3)]
    rows = pack(examples, seq_len=32) + unpacked(examples[1:2])
    assert len(rows) == 2
    return examples + examples[1:2], collate(rows, pad_id=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_attend_only_to_themselves(small_model, packed_examples, attention):
    small_model.set_attn_implementation(attention)
    examples, batch = packed_examples
    with torch.no_grad():
        logits = small_model(**model_inputs(batch, attention)).logits
        alone = [small_model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
        # the old rows (no positions, a padding mask only) let the middle example see the first one
        leaky = small_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    spans = [(0, 0, 5), (0, 5, 14), (0, 14, 20), (1, 0, 9)]  # (row, start, end) of each example
    for (row, start, end), expected in zip(spans, alone):
        torch.testing.assert_close(logits[row, start:end], expected, atol=1e-5, rtol=0)
    assert (leaky[0, 5:14] - alone[1]).abs().max() > 1e-2


def test_packed_row_loss_is_the_token_weighted_loss_of_its_examples(small_model, packed_examples):
    small_model.set_attn_implementation("sdpa")
    examples, batch = packed_examples
    with torch.no_grad():
        loss, tokens = causal_lm_loss(small_model, batch)
        alone = [small_model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
                 for e in examples]
    targets = [sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples]  # shifted: labels[1:] only
    expected = sum(n * float(x) for n, x in zip(targets, alone)) / sum(targets)
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert tokens == 20 + 9


def test_the_lm_head_on_label_positions_only_gives_the_hf_loss_and_gradients(small_model, packed_examples):
    small_model.set_attn_implementation("sdpa")
    _, batch = packed_examples
    inputs = model_inputs(batch, "sdpa")
    grads = []
    for loss_of in (lambda: small_model(**inputs).loss, lambda: loss_on_labels(small_model, inputs)):
        small_model.zero_grad()
        loss = loss_of()
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in small_model.parameters()]))
    (full, full_grads), (mine, my_grads) = grads
    assert mine == pytest.approx(full, abs=1e-6)
    for a, b in zip(full_grads, my_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    unlabelled = {**inputs, "labels": torch.full_like(inputs["labels"], IGNORE_INDEX)}
    assert float(loss_on_labels(small_model, unlabelled)) == 0.0


def test_level_sid_softmax_scores_each_code_against_its_level_and_text_against_the_vocabulary(
        small_model, packed_examples):
    small_model.set_attn_implementation("sdpa")
    _, batch = packed_examples
    inputs = model_inputs(batch, "sdpa")
    # two "levels" of 8 codes: one consecutive run of ids, one scattered; the random labels hit both and other ids
    sid_codes = torch.tensor([list(range(40, 48)), [3, 9, 17, 22, 30, 51, 58, 63]])
    labels = inputs["labels"][:, 1:]
    assert {int(t) for t in labels[labels != IGNORE_INDEX]} & set(sid_codes[0].tolist())
    assert {int(t) for t in labels[labels != IGNORE_INDEX]} & set(sid_codes[1].tolist())
    tables = SidCodeTables.of(sid_codes, VOCAB)
    small_model.zero_grad()
    loss = loss_on_labels(small_model, inputs, tables)
    loss.backward()
    mine = [p.grad.clone() for p in small_model.parameters()]
    small_model.zero_grad()
    logits = small_model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1]
    keep = labels != IGNORE_INDEX
    logits, targets = logits[keep], labels[keep]
    terms = []
    for row, target in zip(logits, targets.tolist()):
        level = next((lv for lv in range(2) if target in sid_codes[lv].tolist()), None)
        if level is None:
            terms.append(-torch.log_softmax(row, -1)[target])
        else:
            index = sid_codes[level].tolist().index(target)
            terms.append(-torch.log_softmax(row[sid_codes[level]], -1)[index])
    expected = torch.stack(terms).mean()
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)
    assert float(loss) < float(loss_on_labels(small_model, inputs))  # 8 codes are an easier choice than 64 tokens
    for a, b in zip(mine, (p.grad for p in small_model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    unlabelled = {**inputs, "labels": torch.full_like(inputs["labels"], IGNORE_INDEX)}
    assert float(loss_on_labels(small_model, unlabelled, tables)) == 0.0


def test_flash_attention_gets_the_boundaries_of_every_packed_run(packed_examples):
    _, batch = packed_examples
    plain = model_inputs(batch, "sdpa")
    assert plain["use_cache"] is False and "attention_mask" not in plain and "cu_seq_lens_q" not in plain
    flash = model_inputs(batch, "flash_attention_2")
    # row 0: examples of 5, 9, 6 tokens; row 1: 9 tokens and 11 of padding, over the flattened batch
    assert flash["cu_seq_lens_q"].tolist() == flash["cu_seq_lens_k"].tolist() == [0, 5, 14, 20, 29, 40]
    assert flash["max_length_q"] == flash["max_length_k"] == 11
    # what transformers' padding-free flash path would derive from the same positions
    (cu_seq_lens, _), (longest, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_seq_lens.tolist() == flash["cu_seq_lens_q"].tolist() and int(longest) == flash["max_length_q"]


def test_encoder_names_an_item_without_sid(encoder):
    with pytest.raises(KeyError, match="item 999"):
        encoder.sid_ids(999)
