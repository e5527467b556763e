"""The evaluate stage: model entries and paths, per-model prompt settings, metrics of hand-made rankings, the row
logic with fakes, and the real stage on a local Ray pool of one vLLM engine (resume from parts, skip, refuse)."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from beam_fixtures import make_prerank_run_dir

from pipelines.common import REPO_ROOT, Parts, StageOutputsMismatch
from pipelines.evaluate import (
    RESULT_SCHEMA,
    EvaluateConfig,
    ModelEntry,
    SelfConsistencySection,
    fingerprints,
    model_metrics,
    rerank_rows,
    rerank_settings,
    resolve_model,
    run,
    table_digest,
)
from pipelines.lineage import stage_inputs
from prerank_candidates import write_candidates
from rec.config import ConfigError, load_config
from rec.engines.reranker import Reranker
from rec.io import RunDir
from rec.rerank import RerankPromptSection, format_answer

TINY_YAML = REPO_ROOT / "pipelines" / "configs" / "tiny" / "evaluate.yaml"
# the fixture model reads 1024 positions and its 400-token vocabulary spends ~1 token per character
# unconstrained, so that the random model's answers are mostly invalid and the fallback is exercised
SMALL_PROMPTS = ["engine.max_model_len=1024", "prompt.history_token_budget=40", "prompt.max_title_chars=16",
                 "sampling.max_tokens=64", "sampling.constrained=false"]
METRIC_KEYS = {"recall@1", "recall@3", "recall@5", "ndcg@3", "ndcg@5", "ndcg@10", "mrr", "invalid_rate",
               "identity_rate", "order_tau", "first_pick_ndcg@5", "random_order_ndcg@5", "invalid_reasons",
               "mean_generated_tokens", "rows", "target_inserted_rows"}


def _config(run_dir, *overrides: str) -> EvaluateConfig:
    return load_config(EvaluateConfig, TINY_YAML, [f"run_dir={run_dir}", *overrides])


def test_tiny_config_and_model_entries_are_checked():
    cfg = _config("x")
    assert [m.name for m in cfg.models] == ["prerank", "midtrain", "sft_target", "sft_reject", "rl"]
    assert cfg.models[0].is_prerank and not cfg.models[1].is_prerank
    assert cfg.sampling.temperature == 0 and cfg.sampling.constrained
    assert ModelEntry(name="prerank").is_prerank and not ModelEntry(name="prerank", path="models/x").is_prerank
    with pytest.raises(ConfigError, match="unique"):
        _config("x", "models=[{name: a, path: prerank}, {name: a, path: models/a}]")
    with pytest.raises(ConfigError, match="'sft' has no path"):
        _config("x", "models=[{name: sft}]")
    with pytest.raises(ConfigError, match="models.0.name"):
        _config("x", "models=[{name: ../x, path: prerank}]")  # names become file names


def test_model_paths_resolve_under_the_run_dir_and_a_missing_one_names_its_stage(tmp_path):
    run_dir = RunDir.open(str(tmp_path / "run"))
    (tmp_path / "run" / "models" / "sft_reject").mkdir(parents=True)
    (tmp_path / "run" / "models" / "sft_reject" / "config.json").write_text("{}")
    assert resolve_model(run_dir, ModelEntry(name="prerank")) is None
    assert resolve_model(run_dir, ModelEntry(name="p", path="prerank")) is None
    expected = str(tmp_path / "run" / "models" / "sft_reject")
    assert resolve_model(run_dir, ModelEntry(name="r", path="models/sft_reject")) == expected
    assert resolve_model(run_dir, ModelEntry(name="r", path=expected)) == expected
    assert resolve_model(run_dir, ModelEntry(name="r", path="models/sft_reject"), str(tmp_path / "run")) == expected
    with pytest.raises(FileNotFoundError, match=r"model 'sft_target': no checkpoint at .*models/sft_target.*the sft stage"):
        resolve_model(run_dir, ModelEntry(name="sft_target", path="models/sft_target"))
    with pytest.raises(FileNotFoundError, match="the rl stage"):
        resolve_model(run_dir, ModelEntry(name="rl", path="/nowhere/models/rl"))
    remote = RunDir(pafs._MockFileSystem(), "bucket/run")  # an object store: relative paths need model_root
    with pytest.raises(ConfigError, match="model_root"):
        resolve_model(remote, ModelEntry(name="r", path="models/sft_reject"))
    assert resolve_model(remote, ModelEntry(name="r", path="models/sft_reject"), str(tmp_path / "run")) == expected


def test_a_model_is_prompted_with_the_settings_in_its_gr2_rerank_json(tmp_path):
    cfg = _config("x")
    model = tmp_path / "sft"
    model.mkdir()
    assert rerank_settings(str(model), cfg) == (cfg.prompt, "<|im_end|>")  # no file: the config's section
    trained = {"history_token_budget": 123, "max_title_chars": 33, "priming": "Beauty.", "chat_template_kwargs": {}}
    (model / "gr2_rerank.json").write_text(json.dumps({"prompt": trained, "eos_token": "<|endoftext|>"}))
    prompt, eos = rerank_settings(str(model), cfg)
    assert prompt.model_dump() == trained and eos == "<|endoftext|>"
    entry = ModelEntry(name="sft", path=str(model))
    fp, parts_fp = fingerprints(cfg, entry, str(model), prompt, eos, "digest")
    assert fp["prompt"]["history_token_budget"] == 123 and fp["eos_token"] == "<|endoftext|>"
    assert "max_rows" in fp and "max_rows" not in parts_fp
    (model / "gr2_rerank.json").write_text(json.dumps({"prompt": {"history_token_budgt": 1}}))
    with pytest.raises(ConfigError, match=r"gr2_rerank.json: not valid re-rank settings: prompt.history_token_budgt: Extra inputs"):
        rerank_settings(str(model), cfg)


def test_a_config_that_would_cut_a_models_trained_answers_is_refused_before_any_work(tmp_path):
    """The model folder holds only config.json and gr2_rerank.json: the check runs before a row is read or an
    engine starts, and names both fields."""
    from rec.rerank import RerankPromptSection
    from rec.rerank_settings import RERANK_SETTINGS, RerankLengths, rerank_settings_json

    model = tmp_path / "run" / "models" / "sft_reject"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    prompt = RerankPromptSection(history_token_budget=400, max_title_chars=80)
    (model / RERANK_SETTINGS).write_text(json.dumps(rerank_settings_json(
        prompt, "<|im_end|>", RerankLengths(max_answer_tokens=1024, teacher_max_tokens=1024))))
    models = ["models=[{name: prerank}, {name: sft_reject, path: models/sft_reject}]", "sampling.constrained=false"]
    with pytest.raises(ConfigError, match=r"evaluate \(model 'sft_reject'\) sampling.max_tokens=512 < "
                                          r".*models/sft_reject/gr2_rerank.json lengths.max_answer_tokens=1024 "
                                          r"\(trained on\)"):
        run(_config(tmp_path / "run", *models, "sampling.max_tokens=512"))  # no candidates exist: never read
    with pytest.raises(ConfigError, match=r"evaluate \(model 'sft_reject'\) engine.max_model_len=2048 < prompt "
                                          r"~1110 \(.*gr2_rerank.json prompt.history_token_budget=400"):
        run(_config(tmp_path / "run", *models, "sampling.max_tokens=1024"))
    with pytest.raises(FileNotFoundError, match="candidates/test.parquet"):  # lengths agree: on to the rows
        run(_config(tmp_path / "run", *models, "sampling.max_tokens=1024", "engine.max_model_len=4096"))


def _rows(rankings, valid, reasons, targets, candidates, tokens, inserted) -> pa.Table:
    return pa.table({"target": targets, "candidates": candidates, "ranking": rankings, "valid": valid,
                     "reason": reasons, "generated_tokens": tokens, "target_inserted": inserted})


def test_metrics_of_hand_made_rankings_count_fallbacks_as_invalid_not_identity():
    table = _rows(
        rankings=[[1, 3, 2], [4, 5, 6], [7, 8, 9], [10, 11, 12]],
        valid=[True, True, False, False],
        reasons=[None, None, "truncated", "prompt_too_long"],
        targets=[1, 6, 8, 10],
        candidates=[[3, 1, 2], [4, 5, 6], [7, 8, 9], [10, 11, 12]],  # rows 2-4: the final ranking is the incoming one
        tokens=[10, 20, 30, 0],
        inserted=[False, True, False, False],
    )
    m = model_metrics(table)
    assert METRIC_KEYS == set(m)
    assert m["recall@1"] == 0.5 and m["recall@3"] == 1.0 and m["recall@5"] == 1.0
    assert math.isclose(m["ndcg@3"], (1 + 1 / math.log2(4) + 1 / math.log2(3) + 1) / 4)
    assert math.isclose(m["mrr"], (1 + 1 / 3 + 1 / 2 + 1) / 4)
    assert m["identity_rate"] == 0.25  # row 2 only: rows 3 and 4 end in the incoming order by fallback
    assert m["invalid_rate"] == 0.5 and m["invalid_reasons"] == {"prompt_too_long": 1, "truncated": 1}
    assert m["mean_generated_tokens"] == 15.0 and m["rows"] == 4 and m["target_inserted_rows"] == 1
    # the valid answers' agreement with the incoming order: row 1 swaps one of 3 pairs (tau 1/3), row 2 keeps it
    assert math.isclose(m["order_tau"], (1 / 3 + 1) / 2)
    # only the first item moved: row 1 picks 1 (its target) -> [1, 3, 2]; the others keep the incoming order
    assert math.isclose(m["first_pick_ndcg@5"], (1 + 1 / math.log2(4) + 1 / math.log2(3) + 1) / 4)
    assert math.isclose(m["random_order_ndcg@5"], (1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)


def test_first_pick_diagnostic_keeps_the_incoming_order_behind_the_models_first_item():
    # a model that names the target first but scrambles the rest scores 1 either way; one that names a wrong first
    # item and reverses the rest loses more than the first pick alone costs
    table = _rows(rankings=[[9, 8, 7], [3, 2, 1]], valid=[True, True], reasons=[None, None], targets=[9, 1],
                  candidates=[[7, 8, 9], [1, 2, 3]], tokens=[0, 0], inserted=[False, False])
    m = model_metrics(table)
    assert m["order_tau"] == -1.0 and m["identity_rate"] == 0.0
    assert math.isclose(m["ndcg@5"], (1 + 1 / math.log2(4)) / 2)
    assert math.isclose(m["first_pick_ndcg@5"], (1 + 1 / math.log2(3)) / 2)  # [9, 7, 8] and [3, 1, 2]


class FakePrompts:
    """Prompt ids of 100 tokens per history item; SIDs `<n>`; JSON answers (the default prompt section)."""

    section = RerankPromptSection()

    def prompt(self, history, candidates):
        return "prompt", [0] * (100 * len(history))

    def candidate_sids(self, candidates):
        return [f"<{i}>" for i in candidates]

    def candidate_token_ids(self, candidates):
        return [[i] for i in candidates]


class FakeGenerator:
    def __init__(self, answers: list[str]):
        self.answers, self.requests = answers, []

    def max_tokens(self, candidate_token_ids):
        return 64

    def generate(self, prompts, candidate_token_ids, samples):
        self.requests.append(len(prompts))
        assert list(samples) == [1] * len(prompts)
        return [[(self.answers.pop(0), 9)] for _ in prompts]


def test_rows_parse_answers_fall_back_on_invalid_ones_and_skip_prompts_that_do_not_fit():
    batch = pa.table({"row_id": [0, 1, 2, 3], "history": [[1], [1], [1] * 20, [1]],
                      "candidates": [[7, 8, 9], [7, 8, 9], [7, 8, 9], [7, 8, 9]], "target": [8, 8, 8, 8]})
    generator = FakeGenerator([format_answer("why", ["<8>", "<9>", "<7>"]), "no json at all",
                               format_answer("same", ["<7>", "<8>", "<9>"])])
    out = rerank_rows(Reranker(FakePrompts(), generator, 1024), batch)
    assert out.schema == RESULT_SCHEMA and generator.requests == [3]  # row 2 (2000 + 64 tokens) is never sent
    rows = out.to_pylist()
    assert [r["ranking"] for r in rows] == [[8, 9, 7], [7, 8, 9], [7, 8, 9], [7, 8, 9]]
    assert [r["valid"] for r in rows] == [True, False, False, True]
    assert [r["reason"] for r in rows] == [None, "no_answer", "prompt_too_long", None]
    assert [r["generated_tokens"] for r in rows] == [9, 9, 0, 9]
    assert rows[1]["completion"] == "no json at all" and rows[2]["completion"] is None


class OrderGenerator:
    """Answers that rank the candidates by `rule(shown order)`; the lists named in `invalid` get no answer."""

    def __init__(self, rule, invalid=()):
        self.rule, self.invalid, self.shown = rule, [list(c) for c in invalid], []

    def max_tokens(self, candidate_token_ids):
        return 64

    def generate(self, prompts, candidate_token_ids, samples):
        answers = []
        for tokens in candidate_token_ids:
            shown = [t for (t,) in tokens]
            self.shown.append(shown)
            answers.append([("no json" if shown in self.invalid else
                             format_answer("", [f"<{i}>" for i in self.rule(shown)]), 5)])
        return answers


def _lists(*candidates) -> pa.Table:
    return pa.table({"row_id": list(range(len(candidates))), "history": [[1]] * len(candidates),
                     "candidates": [list(c) for c in candidates], "target": [c[0] for c in candidates]})


def test_self_consistency_aggregates_answers_to_several_orders_of_each_list():
    from rec.consistency import borda, candidate_orders

    first, second = list(range(100, 110)), list(range(200, 210))
    batch = _lists(first, second)
    four = SelfConsistencySection(orders=4)
    orders = [candidate_orders(c, 4, 0, row) for row, c in enumerate(batch.column("candidates").to_pylist())]
    copier = OrderGenerator(lambda shown: shown)  # leans on position only: answers the order it is shown
    plain = rerank_rows(Reranker(FakePrompts(), copier, 1024), batch).to_pylist()
    assert [r["ranking"] for r in plain] == [first, second] and copier.shown == [first, second]
    copier.shown.clear()
    rows = rerank_rows(Reranker(FakePrompts(), copier, 1024), batch, four, seed=0).to_pylist()
    assert copier.shown == [o for row in orders for o in row]  # K x rows lists, the incoming order first
    assert [r["ranking"] for r in rows] == [borda(o, o[0]) for o in orders]
    assert all(r["ranking"] != o[0] for r, o in zip(rows, orders))  # copying no longer reproduces the pre-rank order
    assert [r["generated_tokens"] for r in rows] == [20, 20] and all(r["valid"] for r in rows)
    assert len(json.loads(rows[0]["completion"])) == 4
    # a ranker that ignores position (by item id, descending) keeps its ranking; invalid answers are left out, and a
    # list whose every answer is invalid keeps the pre-rank order with the first answer's reason
    content = OrderGenerator(lambda shown: sorted(shown, reverse=True), invalid=[orders[0][1], *orders[1]])
    rows = rerank_rows(Reranker(FakePrompts(), content, 1024), batch, four, seed=0).to_pylist()
    assert rows[0]["ranking"] == first[::-1] and rows[0]["valid"] and rows[0]["reason"] is None
    assert rows[1]["ranking"] == second and not rows[1]["valid"] and rows[1]["reason"] == "no_answer"
    metrics = model_metrics(_rows([r["ranking"] for r in rows], [r["valid"] for r in rows],
                                  [r["reason"] for r in rows], [100, 200], [first, second],
                                  [r["generated_tokens"] for r in rows], [False, False]))
    assert (metrics["identity_rate"], metrics["invalid_rate"]) == (0.0, 0.5)  # of the aggregated rankings


def test_self_consistency_is_per_model_and_off_keeps_the_recorded_fingerprint():
    cfg = _config("x", "models=[{name: prerank}, {name: rl_sc4, path: models/rl, self_consistency: {orders: 4}}]")
    assert cfg.models[1].self_consistency.orders == 4 and cfg.models[0].self_consistency.orders == 1
    plain = ModelEntry(name="rl", path="models/rl")
    fp, _ = fingerprints(cfg, plain, None, cfg.prompt, cfg.eos_token, "digest")
    assert fp["model"] == {"name": "rl", "path": "models/rl"}  # as rows files written before the option hold it
    fp, _ = fingerprints(cfg, cfg.models[1], None, cfg.prompt, cfg.eos_token, "digest")
    assert fp["model"]["self_consistency"] == {"orders": 4, "aggregate": "borda"}
    with pytest.raises(ConfigError, match="pre-rank order: it has no answers to aggregate"):
        _config("x", "models=[{name: prerank, self_consistency: {orders: 2}}]")


def _ablation():
    """bench/rerank_ablation.py (bench/ is a folder of scripts, not a package)."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import rerank_ablation

    return rerank_ablation


def test_ablation_dry_run_prints_every_variants_commands_and_skips_evaluated_ones(tmp_path, capsys):
    ablation = _ablation()
    run_dir = RunDir.open(str(tmp_path / "run"))
    run_dir.write_parquet(pa.table({"row_id": [0]}), "eval", "rows_sft_reject.parquet")
    assert ablation.main(["--run-dir", run_dir.root, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# sft_reject: done" in out and "# prerank: pre-rank order" in out
    commands = [line.split() for line in out.splitlines() if line.startswith("python ")]
    evaluations = [c for c in commands if c[2] == "pipelines.evaluate"]
    assert len(evaluations) == len(ablation.variants()) - 1  # every variant but the evaluated one
    run = f"run_dir={run_dir.root}"
    assert all(run in c and "pipelines/configs/tiny_full/" in c[4] for c in commands)
    text = out.replace("'", "")
    assert "pipelines.sft --config pipelines/configs/tiny_full/sft.yaml " + run + \
        " source=reject prompt.shuffle_candidates=true output=sft_reject_shuffle" in text
    # the preset's own SFT run left `output` null: naming it would change the fingerprint of the finished model
    assert f"pipelines.sft --config pipelines/configs/tiny_full/sft.yaml {run} source=reject\n" in text
    assert "init_model=models/midtrain output=rl_zero" in text and "rl.steps=1000 output=rl_long" in text
    # the SIDs answer: trained with it (saved in gr2_rerank.json), or set on the untuned model's evaluation
    assert ("source=reject prompt.history_format=midtrain prompt.layout=next_item prompt.answer=sids "
            "output=sft_reject_nextsids") in text
    assert ('[{"name": "midtrain_nextsids", "path": "models/midtrain"}] prompt.history_format=midtrain '
            'prompt.layout=next_item prompt.answer=sids') in out.replace("'", "").replace("models=", "")
    assert ("init_model=models/midtrain prompt.history_format=midtrain prompt.layout=next_item prompt.answer=sids "
            "output=rl_zero_nextsids") in text  # RL-zero on the SIDs answer: the prompt comes from the RL config
    assert "prompt.answer=sids prompt.answer_top=1 output=rl_zero_nexttop1" in text
    assert "sampling.max_explanation_tokens=0 output=rl_noexp" in text
    assert '"name": "rl_sc4", "path": "models/rl", "self_consistency": {"orders": 4' in text
    assert "prompt.history_format=midtrain output=sft_reject_midhist" in text
    assert "prompt.history_format=midtrain prompt.layout=next_item output=sft_reject_nextitem" in text
    from pipelines.rl import RlConfig
    from pipelines.sft import SftConfig

    for line in out.splitlines():  # every evaluation's and every SFT run's overrides make a valid config
        if "pipelines.evaluate" in line:
            assert len(_config(run_dir.root, *shlex.split(line)[6:]).models) == 1
        if "pipelines.sft" in line:
            args = shlex.split(line)
            assert load_config(SftConfig, REPO_ROOT / args[4], args[5:]).output_name.startswith("sft_reject")
        if "pipelines.rl" in line:
            args = shlex.split(line)
            assert load_config(RlConfig, REPO_ROOT / args[4], args[5:]).output.startswith("rl")
    assert not run_dir.exists("models") and not run_dir.exists(*ablation.SECONDS_FILE)  # nothing ran
    assert ablation.main(["--run-dir", run_dir.root, "--dry-run", "--long-lr", "1e-4", "--only", "rl_long_lr0.0001"]) == 0
    assert "rl.steps=1000 train.lr=0.0001 output=rl_long_lr0.0001" in capsys.readouterr().out


def test_ablation_table_has_a_row_per_evaluated_variant_with_the_asked_columns(tmp_path):
    ablation = _ablation()
    row = {"lever": "RL from SFT", "model": "rl", "orders": 1, "recall@1": 0.1177, "ndcg@5": 0.3293,
           "ndcg@10": 0.4735, "identity_rate": 0.0, "invalid_rate": 0.0, "train_s": 558.0, "eval_s": None,
           "val_curve": [{"step": 20, "val_recall@1": 0.2, "val_ndcg@5": 0.4}], "commands": ["python -m x"]}
    results = {"run_dir": "runs/tiny_full", "preset": "tiny_full", "rows": 1478, "not_evaluated": ["rl_long"],
               "variants": {"prerank": {**row, "lever": "pre-rank order", "model": None, "recall@1": 0.2605,
                                        "ndcg@5": 0.4670, "ndcg@10": 0.5731, "identity_rate": 1.0, "train_s": None,
                                        "val_curve": None},
                            "rl": row}}
    ablation.write_results(results, tmp_path / "rerank_ablation_tiny_full")
    table = (tmp_path / "rerank_ablation_tiny_full.md").read_text()
    assert ("| variant | lever | N@5 | N@10 | R@1 | identity | invalid | tau | pick N@5 | train s | eval s |"
            in table)
    assert "| prerank | pre-rank order | 0.4670 | 0.5731 | 0.2605 | 1.0000 | 0.0000 | - | - | - | - |" in table
    assert "| rl | RL from SFT | 0.3293 | 0.4735 | 0.1177 | 0.0000 | 0.0000 | - | - | 558 | - |" in table
    assert "1478 test lists" in table and "Not evaluated yet: rl_long." in table
    assert json.loads((tmp_path / "rerank_ablation_tiny_full.json").read_text()) == results


def test_ablation_results_keep_an_earlier_runs_option_named_rows_while_their_rows_file_exists(tmp_path):
    """A variant named by an option (`--zero-lr 1e-4` -> rl_zero_nexttop1_lr0.0001) is not among the next run's
    variants; its row stays in the results file as long as the run dir holds its rows and it covers the same lists."""
    ablation = _ablation()
    run_dir = RunDir.open(str(tmp_path / "run"))
    run_dir.write_parquet(pa.table({"row_id": [0]}), "eval", "rows_rl_zero_nexttop1_lr0.0001.parquet")
    row = {"lever": "x", "rows": 2}
    stem = tmp_path / "results"
    stem.with_suffix(".json").write_text(json.dumps({"run_dir": run_dir.root, "rows": 2, "variants": {
        "rl_zero_nexttop1_lr0.0001": row, "gone": row, "other_lists": {"rows": 3}}}))
    now = {"run_dir": run_dir.root, "rows": 2, "not_evaluated": [], "variants": {"prerank": row}}
    run_dir.write_parquet(pa.table({"row_id": [0]}), "eval", "rows_other_lists.parquet")
    assert list(ablation.with_earlier_rows(now, stem, run_dir)["variants"]) == ["prerank", "rl_zero_nexttop1_lr0.0001"]
    assert ablation.with_earlier_rows({**now, "run_dir": "elsewhere"}, stem, run_dir)["variants"] == {"prerank": row}


def test_ablation_results_come_from_the_rows_files_and_must_share_the_test_lists(tmp_path):
    ablation = _ablation()
    run_dir = RunDir.open(str(tmp_path / "run"))
    rows = _rows(rankings=[[1, 2], [4, 3]], valid=[True, True], reasons=[None, None], targets=[1, 3],
                 candidates=[[1, 2], [3, 4]], tokens=[0, 0], inserted=[False, False])
    rows = rows.append_column("row_id", pa.array([0, 1]))
    run_dir.write_parquet(rows, "eval", "rows_prerank.parquet")
    run_dir.write_parquet(rows, "eval", "rows_rl.parquet")
    chosen = [v for v in ablation.variants() if v.name in ("prerank", "rl", "rl_zero")]
    results = ablation.collect(run_dir, chosen, "tiny_full", {"rl": 12.5})
    assert list(results["variants"]) == ["prerank", "rl"] and results["not_evaluated"] == ["rl_zero"]
    rl = results["variants"]["rl"]
    assert (rl["recall@1"], rl["identity_rate"], rl["eval_s"], rl["train_s"], rl["rows"]) == (0.5, 0.5, 12.5, None, 2)
    assert rl["order_tau"] == 0.0 and math.isclose(rl["first_pick_ndcg@5"], (1 + 1 / math.log2(3)) / 2)
    assert rl["commands"][-1].startswith("python -m pipelines.evaluate")
    run_dir.write_parquet(rows, "eval", "rows_rl_promoted.parquet")  # a row of another source's run
    assert ablation.main(["--run-dir", run_dir.root, "--only", "prerank", "--out", str(tmp_path / "t")]) == 0
    written = json.loads((tmp_path / "t.json").read_text())
    assert list(written["variants"]) == ["prerank", "rl", "rl_promoted"] and written["not_evaluated"] == []
    assert "A random order of these lists scores N@5 0.8155 in expectation." in (tmp_path / "t.md").read_text()
    assert written["variants"]["rl_promoted"]["lever"] == "RL from sft_promoted"
    run_dir.write_parquet(rows.slice(0, 1), "eval", "rows_rl.parquet")
    with pytest.raises(ValueError, match="different test lists"):
        ablation.collect(run_dir, chosen, "tiny_full", {})


def test_stage_on_a_real_ray_pool_resumes_skips_and_refuses_another_config(tmp_path):
    """The pre-rank order and a random tiny model (which never learned the answer format) on 12 test rows: one real
    vLLM async engine (continuous batching, its engine core a child process, as on GPUs) in an async Ray Data actor
    with 2 batches in flight; two rows of the model were finished by an earlier run."""
    import ray

    run_dir = make_prerank_run_dir(tmp_path / "run", max_users=40)
    write_candidates(run_dir, rows=12, split="test")
    overrides = [*SMALL_PROMPTS, "models=[{name: prerank}, {name: random, path: models/midtrain}]",
                 "insert_missing_target=false", "max_rows=null", "actors=1", "num_cpus=2", "batch_size=4",
                 "flush_rows=4", "continuous=true", "concurrent_batches=2"]
    cfg = _config(run_dir.root, *overrides)
    model = run_dir.local_path("models", "midtrain")
    _, parts_fp = fingerprints(cfg, cfg.models[1], model, cfg.prompt, cfg.eos_token,
                               table_digest(run_dir.read_parquet("candidates", "test.parquet")))
    parts_fp["inputs"] = stage_inputs(run_dir, "evaluate")  # as run() keys them
    earlier = pa.table({"row_id": [0, 1], "ranking": [[-1], [-2]], "valid": [False, False],
                        "reason": ["bad_json", "bad_json"], "generated_tokens": [5, 5],
                        "completion": ["earlier", "earlier"]}, schema=RESULT_SCHEMA)
    Parts(run_dir, "eval", "random", parts_fp).write(earlier)
    try:
        result = run(cfg)
    finally:
        ray.shutdown()
    metrics = json.loads(Path(run_dir.local_path("eval", "metrics.json")).read_text())
    assert metrics == result["metrics"] and list(metrics) == ["prerank", "random"]
    assert all(METRIC_KEYS == set(m) for m in metrics.values())
    prerank, random = metrics["prerank"], metrics["random"]
    assert (prerank["identity_rate"], prerank["invalid_rate"], prerank["mean_generated_tokens"]) == (1.0, 0.0, 0.0)
    assert prerank["rows"] == random["rows"] == 12 and random["target_inserted_rows"] == 0
    assert random["invalid_rate"] >= 0.75 and sum(random["invalid_reasons"].values()) == round(12 * random["invalid_rate"])
    rows = run_dir.read_parquet("eval", "rows_random.parquet").to_pylist()
    assert [r["completion"] for r in rows[:2]] == ["earlier", "earlier"]  # kept, not regenerated
    for row in rows[2:]:
        assert 0 < row["generated_tokens"] <= 64
        if not row["valid"]:
            assert row["ranking"] == row["candidates"] and row["reason"]  # the pre-rank order, with the reason
    table = Path(run_dir.local_path("eval", "table.md")).read_text()
    assert "| prerank | " in table and "| random | " in table and "target inserted into 0 of 12 lists" in table
    assert Path(run_dir.local_path("eval", "metrics.png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not run_dir.exists("eval", "_parts")
    written = Path(run_dir.local_path("eval", "rows_random.parquet")).stat().st_mtime_ns
    again = run(cfg)  # finished: no engine starts, the rows files stay as they are
    assert again["skipped"] == ["prerank", "random"] and again["metrics"] == metrics
    assert Path(run_dir.local_path("eval", "rows_random.parquet")).stat().st_mtime_ns == written
    with pytest.raises(StageOutputsMismatch, match="rows_random.parquet .*fields differ: sampling"):
        run(_config(run_dir.root, *overrides, "sampling.max_tokens=32"))


def test_prompt_transfer_scores_each_candidate_as_the_first_answer_item_of_every_layout(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import prompt_transfer
    import torch

    from rec.model import load_student

    assert prompt_transfer.answer_opening() == '{"explanation": "", "recommendations": ["'
    run_dir = make_prerank_run_dir(tmp_path / "run", max_users=40)
    table = write_candidates(run_dir, rows=6, split="test")
    # batched scores (right-padded) are each candidate's own teacher-forced log-probability
    tokenizer, model = load_student(run_dir.local_path("models", "midtrain"), dtype=torch.float32)
    prefix, candidates = [5, 6, 7], [[8, 9], [10], [11, 12, 13]]
    batched = prompt_transfer.candidate_scores(model, tokenizer, prefix, candidates)
    for n, c in enumerate(candidates):
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([prefix + c])).logits.log_softmax(-1)[0]
        alone = sum(logprobs[len(prefix) - 1 + j, t].item() for j, t in enumerate(c))
        assert math.isclose(batched[n], alone, rel_tol=1e-4, abs_tol=1e-4)
    assert prompt_transfer.main(["--run-dir", run_dir.root, "--rows", "4", "--threads", "1",
                                 "--out", str(tmp_path / "pt")]) == 0
    results = json.loads((tmp_path / "pt.json").read_text())
    first = table.slice(0, 4).to_pylist()
    assert results["rows"] == 4 and set(results["recall@1"]) == set(prompt_transfer.LAYOUTS)
    assert results["prerank_recall@1"] == sum(r["candidates"][0] == r["target"] for r in first) / 4
    assert results["random_recall@1"] == 0.1
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in results["recall@1"].values())
    assert "| rerank_prompt_midhist |" in (tmp_path / "pt.md").read_text()
