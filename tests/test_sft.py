"""SFT of the re-ranker: examples and their loss mask, and the stage on Ray Train + DeepSpeed (ZeRO-2 and ZeRO-3).

The stage tests train on synthetic accepted traces (candidate lists from tests/prerank_candidates.py, answers
written with rec.rerank.format_answer, target first): the traces-file contract, without running a teacher.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from beam_fixtures import make_prerank_run_dir
from prerank_candidates import write_candidates
from stage_process import kill_when
from safetensors.torch import load_file

from pipelines.common import REPO_ROOT
from pipelines.sft import SftConfig, run
from pipelines.train_utils import read_train_log, read_trainer_state, tensorboard_tag
from rec.config import ConfigError, load_config
from rec.rerank import PromptBuilder, RerankPromptSection, catalogue, format_answer, parse_answer
from rec.sft_data import IGNORE_INDEX, answer_segments, build_example, collate, weighted_lm_loss

TINY_YAML = REPO_ROOT / "pipelines" / "configs" / "tiny" / "sft.yaml"
SMALL_PROMPT = ["prompt.history_token_budget=40", "prompt.max_title_chars=16"]


def _config(run_dir, *overrides: str) -> SftConfig:
    return load_config(SftConfig, TINY_YAML, [
        f"run_dir={run_dir}", *SMALL_PROMPT, "max_len=1024", "train.batch_size=2", "train.lr=0.003",
        "train.warmup_steps=1", "train.log_every_steps=1", "train.shuffle_buffer_rows=0", "eval_every_steps=2",
        "eval_fraction=0.2", *overrides,
    ])


def write_traces(run_dir, rows: int = 24, source: str = "reject") -> pa.Table:
    """Accepted traces whose answers rank the target first, the rest in list order."""
    candidates = write_candidates(run_dir, rows=rows, seed=1)
    sid_of, _ = catalogue(run_dir)
    completions, rankings = [], []
    for target, listed in zip(candidates.column("target").to_pylist(), candidates.column("candidates").to_pylist()):
        rankings.append([target] + [i for i in listed if i != target])
        completions.append(format_answer(f"bought {len(listed)} things", [sid_of[i] for i in rankings[-1]]))
    table = candidates.append_column("completion", pa.array(completions)).append_column(
        "ranking", pa.array(rankings, pa.list_(pa.int64()))).append_column(
        "accepted", pa.array([True] * (rows - 2) + [False] * 2))
    run_dir.write_parquet(table, "traces", f"{source}.parquet")
    return table


@pytest.fixture(scope="module")
def sft_run_dir(tmp_path_factory):
    run_dir = make_prerank_run_dir(tmp_path_factory.mktemp("sft") / "run", max_users=40)
    write_traces(run_dir)
    return run_dir


def test_answer_segments_split_reasoning_from_the_ranking():
    text = '<think>why</think>{"explanation": "a \\"quoted\\" b", "recommendations": ["x"]}'
    segments = answer_segments(text)
    assert "".join(piece for piece, _ in segments) == text
    assert [piece for piece, reasoning in segments if reasoning] == ["why", 'a \\"quoted\\" b']


def test_loss_mask_covers_exactly_the_assistant_turn(sft_run_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_run_dir.local_path("models", "midtrain"))
    builder = PromptBuilder(tokenizer, *catalogue(sft_run_dir), RerankPromptSection(history_token_budget=40))
    traces = sft_run_dir.read_parquet("traces", "reject.parquet").to_pylist()[0]
    text, prompt_ids = builder.prompt(traces["history"], traces["candidates"])
    assert "actually bought" not in text  # the student's prompt never names the target
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    example = build_example(tokenizer, prompt_ids, traces["completion"], eos, 0.5, 1.0)
    labelled = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert labelled == list(range(len(prompt_ids), len(example.input_ids)))
    answer = tokenizer.decode([example.input_ids[i] for i in labelled], skip_special_tokens=False)
    assert answer == traces["completion"] + "<|im_end|>"
    weights = np.array(example.weights)
    assert (weights[: len(prompt_ids)] == 0).all() and set(weights[len(prompt_ids):]) == {0.5, 1.0}
    reasoning = [example.input_ids[i] for i in labelled if example.weights[i] == 0.5]
    assert tokenizer.decode(reasoning) == "bought 10 things"
    assert parse_answer(traces["completion"], builder.candidate_sids(traces["candidates"])).ranking[0] == \
        traces["candidates"].index(traces["target"])


def test_the_saved_lengths_hold_the_teachers_budget_and_the_longest_example(sft_run_dir, tmp_path):
    """The traces stage stores its config in traces/{mode}.parquet; SFT reads the teacher's sampling budget there."""
    import shutil

    from transformers import AutoTokenizer

    from pipelines.sft import answer_lengths, build_examples
    from pipelines.traces import META_KEY
    from rec.io import RunDir

    shutil.copytree(sft_run_dir.root, tmp_path / "run")
    run_dir = RunDir.open(str(tmp_path / "run"))
    traces = run_dir.read_parquet("traces", "reject.parquet")
    sampling = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 300, "constrained": False,
                "max_explanation_tokens": 64}
    run_dir.write_parquet(traces.replace_schema_metadata({META_KEY: json.dumps({"sampling": sampling}).encode()}),
                          "traces", "reject.parquet")
    cfg = _config(run_dir.root)
    tokenizer = AutoTokenizer.from_pretrained(run_dir.local_path("models", "midtrain"))
    examples, counts = build_examples(cfg, run_dir, tokenizer)
    lengths = answer_lengths(cfg, run_dir, counts)
    assert 0 < counts["longest_answer_tokens"] < 300 and counts["longest_prompt_tokens"] > 0
    assert (lengths.max_answer_tokens, lengths.teacher_max_tokens, lengths.constrained) == (300, 300, False)
    assert lengths.longest_answer_tokens == counts["longest_answer_tokens"] and lengths.max_len == 1024
    longest = max(len(e["input_ids"]) for e in examples)
    assert longest <= counts["longest_prompt_tokens"] + counts["longest_answer_tokens"] <= 2 * longest


def test_shuffled_prompts_keep_the_teachers_answers_as_they_are(sft_run_dir):
    """prompt.shuffle_candidates: each prompt lists its candidates in the list's seeded order; the answer tokens (the
    teacher's ranking by SID) are the same, and they still parse to the teacher's ranking of the same items."""
    from transformers import AutoTokenizer

    from pipelines.sft import build_examples
    from rec.consistency import list_key, shuffled
    from rec.rerank import final_ranking

    tokenizer = AutoTokenizer.from_pretrained(sft_run_dir.local_path("models", "midtrain"))
    plain, _ = build_examples(_config(sft_run_dir.root), sft_run_dir, tokenizer)
    mixed, _ = build_examples(_config(sft_run_dir.root, "prompt.shuffle_candidates=true"), sft_run_dir, tokenizer)
    assert len(plain) == len(mixed) == 22

    def answer(example):
        return [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]

    assert [answer(e) for e in mixed] == [answer(e) for e in plain]
    assert sum(e["input_ids"] != p["input_ids"] for e, p in zip(mixed, plain)) >= 20
    sid_of, _ = catalogue(sft_run_dir)
    trace = sft_run_dir.read_parquet("traces", "reject.parquet").to_pylist()[0]
    prompt = tokenizer.decode([t for t, label in zip(mixed[0]["input_ids"], mixed[0]["labels"])
                               if label == IGNORE_INDEX])
    listed = sorted(trace["candidates"], key=lambda item: prompt.index(sid_of[item]))
    assert listed == shuffled(trace["candidates"], list_key(trace["history"], trace["candidates"]))
    ranking, reason = final_ranking(parse_answer(trace["completion"], [sid_of[i] for i in trace["candidates"]]),
                                    trace["candidates"])
    assert reason is None and ranking[0] == trace["target"]


def test_weighted_loss_with_unit_weights_is_the_usual_causal_lm_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
    assert torch.isclose(weighted_lm_loss(logits, labels, torch.ones(2, 5)), expected)
    half = weighted_lm_loss(logits, labels, torch.full((2, 5), 0.5))
    assert torch.isclose(half, expected / 2)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "weights": [0, 1, 1]},
                     {"input_ids": [4], "labels": [4], "weights": [1]}], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and batch["labels"][1].tolist() == [4, -100, -100]


def test_the_stage_loss_runs_the_lm_head_on_answer_positions_only_and_matches_the_full_forward():
    from pipelines.sft import weighted_loss
    from rec.model import ModelSection, build_tiny_model

    model = build_tiny_model(ModelSection(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                          intermediate_size=64), vocab_size=50)
    batch = collate([{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, 4, 5, 6],
                      "weights": [0, 0, 0, 0.5, 0.5, 1]},
                     {"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "weights": [0, 1, 1]}], pad_id=0)
    full = weighted_lm_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"], batch["weights"])
    loss, tokens = weighted_loss(model, batch)
    assert float(loss) == pytest.approx(float(full), abs=1e-6) and tokens == 9
    none = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    assert float(weighted_loss(model, none)[0]) == 0.0


def test_sids_answers_are_the_ranking_alone_for_traces_and_promoted_lists(sft_run_dir):
    """prompt.answer=sids: the teacher's accepted ranking (traces) or the promoted order, as SIDs back to back then
    eos, every answer token weighted as ranking; the prompt is the same as with JSON answers."""
    from transformers import AutoTokenizer

    from pipelines.sft import build_examples

    tokenizer = AutoTokenizer.from_pretrained(sft_run_dir.local_path("models", "midtrain"))
    sid_of, _ = catalogue(sft_run_dir)
    accepted = [r for r in sft_run_dir.read_parquet("traces", "reject.parquet").to_pylist() if r["accepted"]]
    sid_begin = tokenizer.convert_tokens_to_ids("<|sid_begin|>")
    for source, rankings in (("reject", [r["ranking"] for r in accepted]), ("promoted", None)):
        json_examples, _ = build_examples(_config(sft_run_dir.root, f"source={source}"), sft_run_dir, tokenizer)
        examples, counts = build_examples(_config(sft_run_dir.root, f"source={source}", "prompt.answer=sids"),
                                          sft_run_dir, tokenizer)
        assert len(examples) == len(json_examples) == counts["examples"] > 0
        for n, (example, plain) in enumerate(zip(examples, json_examples)):
            labelled = [(t, w) for t, label, w in zip(example["input_ids"], example["labels"], example["weights"])
                        if label != IGNORE_INDEX]
            answer = tokenizer.decode([t for t, _ in labelled], skip_special_tokens=False)
            assert labelled[0][0] == sid_begin and answer.endswith("<|im_end|>") and {w for _, w in labelled} == {1.0}
            json_answer = tokenizer.decode([t for t, label in zip(plain["input_ids"], plain["labels"])
                                            if label != IGNORE_INDEX], skip_special_tokens=False)
            sids = answer.removesuffix("<|im_end|>")
            assert rankings is None or sids == "".join(sid_of[i] for i in rankings[n])
            assert sids == "".join(json.loads(json_answer.removesuffix("<|im_end|>"))["recommendations"])
            prompt = len(example["input_ids"]) - len(labelled)
            assert example["input_ids"][:prompt] == plain["input_ids"][:len(plain["input_ids"]) - len(
                [label for label in plain["labels"] if label != IGNORE_INDEX])]
        top_examples, _ = build_examples(_config(sft_run_dir.root, f"source={source}", "prompt.answer=sids",
                                                 "prompt.answer_top=1"), sft_run_dir, tokenizer)
        for example, full in zip(top_examples, examples):  # answer_top=1: the first SID of the full answer alone
            answer = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
            full_answer = [t for t, label in zip(full["input_ids"], full["labels"]) if label != IGNORE_INDEX]
            first_end = full_answer.index(tokenizer.convert_tokens_to_ids("<|sid_end|>")) + 1
            assert answer == full_answer[:first_end] + full_answer[-1:]


def test_promoted_answers_keep_the_shown_order_with_the_target_first(sft_run_dir, tmp_path):
    """source=promoted reads the pre-rank lists (no traces): each list that holds its target is answered with the
    order the prompt shows, target first, an empty explanation; lists without their target are counted."""
    import shutil

    from transformers import AutoTokenizer

    from pipelines.sft import answer_lengths, build_examples
    from rec.consistency import list_key, shuffled
    from rec.io import RunDir
    from rec.rerank import final_ranking
    from rec.sft_data import promoted_ranking

    shutil.copytree(sft_run_dir.root, tmp_path / "run")
    run_dir = RunDir.open(str(tmp_path / "run"))
    lists = run_dir.read_parquet("candidates", "train.parquet").to_pylist()
    catalogue_items = run_dir.read_parquet("sid", "sid_map.parquet").column("item_id").to_pylist()
    for row in lists[:3]:  # these three lost their target: not trained on, counted
        spare = next(i for i in catalogue_items if i not in row["candidates"] and i != row["target"])
        row["candidates"] = [spare if i == row["target"] else i for i in row["candidates"]]
    run_dir.write_parquet(pa.Table.from_pylist(lists, schema=run_dir.read_parquet("candidates", "train.parquet").schema),
                          "candidates", "train.parquet")
    tokenizer = AutoTokenizer.from_pretrained(run_dir.local_path("models", "midtrain"))
    sid_of, _ = catalogue(run_dir)
    kept = lists[3:]
    for shuffle in (False, True):
        cfg = _config(run_dir.root, "source=promoted", f"prompt.shuffle_candidates={str(shuffle).lower()}")
        examples, counts = build_examples(cfg, run_dir, tokenizer)
        assert (counts["list_rows"], counts["lists_with_target"], counts["rows_without_target"]) == (24, 21, 3)
        assert len(examples) == counts["examples"] == 21
        for example, row in zip(examples, kept):
            answer = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"])
                                       if label != IGNORE_INDEX], skip_special_tokens=False)
            assert answer.endswith("<|im_end|>")
            parsed = parse_answer(answer.removesuffix("<|im_end|>"), [sid_of[i] for i in row["candidates"]])
            ranking, reason = final_ranking(parsed, row["candidates"])
            shown = (shuffled(row["candidates"], list_key(row["history"], row["candidates"])) if shuffle
                     else row["candidates"])
            assert reason is None and parsed.explanation == ""
            assert ranking == promoted_ranking(shown, row["target"]) and ranking[0] == row["target"]
            assert {w for w, label in zip(example["weights"], example["labels"]) if label != IGNORE_INDEX} == {1.0}
        assert sum(r["candidates"] != promoted_ranking(r["candidates"], r["target"]) for r in kept) >= 15
    lengths = answer_lengths(cfg, run_dir, counts)
    assert (lengths.constrained, lengths.max_explanation_tokens, lengths.teacher_max_tokens) == (True, 0, None)
    assert lengths.max_answer_tokens == lengths.longest_answer_tokens == counts["longest_answer_tokens"] > 0
    with pytest.raises(ValueError, match="not among the candidates"):
        promoted_ranking([1, 2], 3)


def test_config_keeps_reasoning_weighted_below_the_ranking():
    with pytest.raises(ConfigError, match="lambda_reasoning"):
        _config("x", "lambda_reasoning=2.0")
    assert _config("x", "source=target").output_name == "sft_target"


def assert_tensorboard_matches(model_dir, history: list[dict], must_have: set[str]) -> None:
    """`<model_dir>/tb/` holds one event file whose scalars, read back by TensorBoard, are the numbers of
    train_log.jsonl at their steps (float32 in the file); `must_have` tags are among them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((Path(model_dir) / "tb").glob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    events = EventAccumulator(str(event_files[0])).Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        for key, value in record.items():
            if key != "step" and value is not None:
                expected.setdefault(tensorboard_tag(key), []).append((record["step"], value))
    assert must_have <= set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in logged] == [step for step, _ in points], tag
        assert np.allclose([v for _, v in logged], [v for _, v in points], rtol=1e-6), tag


def _train_and_check(run_dir, zero_stage: int) -> dict:
    output = f"sft_zero{zero_stage}"
    report = run(_config(run_dir.root, f"train.zero_stage={zero_stage}", "train.max_steps=6", f"output={output}"))
    assert report["examples"] == 22 and report["steps"] == 6  # the 2 rejected rows are not trained on
    history = read_train_log(run_dir, "models", output)
    assert history[-1]["loss"] < history[0]["loss"], [r["loss"] for r in history]
    assert report["final_eval_loss"] is not None and "first_eval_loss" not in report
    evaluated = [r for r in history if r.get("eval_loss") is not None]
    assert report["eval_loss_first_step"] == evaluated[0]["step"] == 2  # eval_every_steps, not step 0
    assert report["eval_loss_first"] == evaluated[0]["eval_loss"]
    assert_tensorboard_matches(run_dir.local_path("models", output), history,
                               {"train/loss", "train/lr", "train/tokens_per_s", "eval/eval_loss"})
    before = load_file(os.path.join(run_dir.local_path("models", "midtrain"), "model.safetensors"))
    after = load_file(os.path.join(run_dir.local_path("models", output), "model.safetensors"))
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    settings = run_dir.read_json("models", output, "gr2_rerank.json")
    assert settings["prompt"]["history_token_budget"] == 40
    # the fixture's traces file has no teacher config: the longest answer trained on is the budget
    lengths = settings["lengths"]
    assert lengths["max_answer_tokens"] == lengths["longest_answer_tokens"] == report["longest_answer_tokens"] > 0
    assert lengths["teacher_max_tokens"] is None and lengths["max_len"] == 1024
    return report


def test_sft_zero3_two_workers_trains_every_parameter(sft_run_dir, ray_cluster):
    _train_and_check(sft_run_dir, zero_stage=3)


@pytest.mark.slow
def test_sft_zero2_two_workers_trains_every_parameter_and_skips_when_done(sft_run_dir, ray_cluster):
    report = _train_and_check(sft_run_dir, zero_stage=2)
    again = run(_config(sft_run_dir.root, "train.zero_stage=2", "train.max_steps=6", "output=sft_zero2"))
    assert again["seconds"] == report["seconds"]  # the finished report is returned, nothing retrained


@pytest.mark.slow
def test_a_killed_sft_run_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL the stage (driver, its local Ray, the workers) once a checkpoint is registered; rerun."""
    run_dir = make_prerank_run_dir(tmp_path / "run", max_users=40)
    write_traces(run_dir)
    overrides = [f"run_dir={run_dir.root}", *SMALL_PROMPT, "max_len=1024", "train.batch_size=2",
                 "train.checkpoint_every_steps=2", "train.log_every_steps=1"]
    command = [sys.executable, "-m", "pipelines.sft", "--config", str(TINY_YAML), *overrides]
    snapshot = tmp_path / "run" / "models" / "sft_reject_ckpt" / "checkpoint_manager_snapshot.json"

    def registered() -> bool:  # Ray Train has registered a checkpoint in storage
        return snapshot.exists() and "checkpoint_step_" in snapshot.read_text()

    kill_when([*command, "train.max_steps=1000"], registered, "a first checkpoint", tmp_path / "first-run.log")
    done = subprocess.run([*command, "train.max_steps=8"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = read_trainer_state(run_dir, "models", "sft_reject")
    assert state["step"] == 8 and state["resumed_from_step"] >= 2 and state["resumed_from_step"] % 2 == 0
