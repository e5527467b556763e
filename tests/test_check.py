"""`python -m pipelines.check`: every shipped preset passes; broken copies (the old qwen3_8b budgets, a prompt or eos
that differs, wrong resources, a file that does not load) fail naming both fields. And serving refuses, at start,
a re-ranker config that would cut the answers its model's gr2_rerank.json says it was trained to write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.check import main
from pipelines.common import REPO_ROOT
from rec.config import ConfigError
from rec.rerank import RerankPromptSection
from rec.rerank_settings import RERANK_SETTINGS, RerankLengths, rerank_settings_json
from serving.config import load_serve_config

PRESETS = sorted(p.name for p in (REPO_ROOT / "pipelines" / "configs").iterdir() if p.is_dir())
TRACES = "pipelines/configs/qwen3_8b/traces.yaml"
SFT = "pipelines/configs/qwen3_8b/sft.yaml"
RL = "pipelines/configs/qwen3_8b/rl.yaml"
EVALUATE = "pipelines/configs/qwen3_8b/evaluate.yaml"
SERVING = "serving/configs/qwen3_8b.yaml"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_passes(preset, capsys):
    assert {"tiny", "tiny_full", "qwen3_8b"} <= set(PRESETS)
    assert main(["--preset", preset]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "lengths: serving re-ranker" in out and "FAIL" not in out


def _copy(tmp_path: Path, preset: str = "qwen3_8b") -> Path:
    shutil.copytree(REPO_ROOT / "pipelines" / "configs" / preset, tmp_path / "pipelines" / "configs" / preset)
    (tmp_path / "serving" / "configs").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "serving" / "configs" / f"{preset}.yaml", tmp_path / "serving" / "configs")
    return tmp_path


def _edit(root: Path, file: str, *changes: tuple[str, object]) -> None:
    """Set dotted fields of a YAML file (of a serving file: under applications[0].args)."""
    path = root / file
    doc = yaml.safe_load(path.read_text())
    node_root = doc["applications"][0]["args"] if file.startswith("serving/") else doc
    for dotted, value in changes:
        *parents, last = dotted.split(".")
        node = node_root
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _fail(root: Path, capsys) -> str:
    assert main(["--preset", "qwen3_8b", "--root", str(root)]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    return captured.err


def test_the_old_qwen3_8b_budgets_fail_naming_both_fields(tmp_path, capsys):
    """Teacher 4,096 tokens with thinking, SFT on 6,144, but RL and evaluation 2,048 and serving 1,024."""
    root = _copy(tmp_path)
    _edit(root, TRACES, ("sampling.max_tokens", 4096), ("engine.max_model_len", 6144))
    _edit(root, SFT, ("max_len", 6144))
    _edit(root, RL, ("sampling.max_tokens", 2048))
    _edit(root, EVALUATE, ("sampling.max_tokens", 2048))
    _edit(root, SERVING, ("reranker.sampling.max_tokens", 1024))
    err = _fail(root, capsys)
    for reader, value in ((f"{RL} sampling.max_tokens", 2048), (f"{EVALUATE} sampling.max_tokens", 2048),
                          (f"{SERVING} reranker.sampling.max_tokens", 1024)):
        assert f"{reader}={value} < {TRACES} sampling.max_tokens=4096 (trained on)" in err
    assert f"{TRACES} engine.max_model_len=6144 < prompt ~" in err  # 4k answers + a ~2k teacher prompt
    assert err.count(f"{EVALUATE} sampling.max_tokens=2048 <") == 1  # one line for both SFT models


def test_an_sft_max_len_too_short_for_the_traces_and_an_rl_buffer_past_max_tokens_fail(tmp_path, capsys):
    root = _copy(tmp_path)
    _edit(root, SFT, ("max_len", 3000))
    _edit(root, RL, ("rl.overlong_buffer", 2048))
    err = _fail(root, capsys)
    assert f"{SFT} max_len=3000 < prompt ~" in err and f"{TRACES} sampling.max_tokens)" in err
    assert f"{RL} rl.overlong_buffer=2048 >= {RL} sampling.max_tokens=2048" in err


def test_promoted_sft_answers_are_budgeted_as_the_ranking_alone(tmp_path, capsys):
    """source=promoted writes its answers (no teacher): SFT's max_len must hold a prompt + the constrained ranking
    with no explanation, not the teacher's budget."""
    root = _copy(tmp_path, "tiny_full")
    sft = "pipelines/configs/tiny_full/sft.yaml"
    _edit(root, sft, ("source", "promoted"))
    assert main(["--preset", "tiny_full", "--root", str(root)]) == 0
    promoted = capsys.readouterr().out
    _edit(root, sft, ("source", "reject"))
    assert main(["--preset", "tiny_full", "--root", str(root)]) == 0
    reject = capsys.readouterr().out

    def teacher_answer(out: str) -> int:
        line = next(line for line in out.splitlines() if "lengths: sft max_len" in line)
        return int(line.split("trained answer ")[1].split()[0])

    assert teacher_answer(promoted) + 48 == teacher_answer(reject)  # the reject traces' 48 explanation tokens


def test_a_mismatched_prompt_section_and_eos_token_fail_naming_both_fields(tmp_path, capsys):
    root = _copy(tmp_path)
    _edit(root, RL, ("prompt.max_title_chars", 100))
    _edit(root, SERVING, ("reranker.prompt.chat_template_kwargs", {"enable_thinking": False}))
    _edit(root, EVALUATE, ("eos_token", "<|endoftext|>"))
    err = _fail(root, capsys)
    assert f"{RL} prompt.max_title_chars=100 != {SFT} prompt.max_title_chars=120" in err
    assert (f"{SERVING} reranker.prompt.chat_template_kwargs={{'enable_thinking': False}} != {SFT} "
            "prompt.chat_template_kwargs={'enable_thinking': True}") in err
    assert f"{EVALUATE} eos_token='<|endoftext|>' != {SFT} eos_token='<|im_end|>'" in err


def test_wrong_resources_and_paths_fail(tmp_path, capsys):
    root = _copy(tmp_path)
    _edit(root, TRACES, ("gpus_per_actor", 4))
    _edit(root, EVALUATE, ("run_dir", "s3://another/run"))
    _edit(root, SERVING, ("reranker.model", "model/sft_reject"))
    err = _fail(root, capsys)
    assert f"{TRACES} gpus_per_actor=4 != {TRACES} engine.extra.tensor_parallel_size=2" in err
    assert f"{EVALUATE} run_dir='s3://another/run' != " in err
    assert f"{SERVING} reranker.model='model/sft_reject' names no stage output" in err


def test_the_tiny_preset_checks_its_cpu_engines(tmp_path, capsys):
    root = _copy(tmp_path, "tiny")
    _edit(root, "pipelines/configs/tiny/evaluate.yaml", ("engine.enforce_eager", False), ("num_cpus", 2))
    assert main(["--preset", "tiny", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "pipelines/configs/tiny/evaluate.yaml engine.enforce_eager=false with " in err
    assert "pipelines/configs/tiny/evaluate.yaml num_cpus=2 < pipelines/configs/tiny/evaluate.yaml actors" in err


def test_a_file_that_does_not_load_exits_2_naming_it(tmp_path, capsys):
    root = _copy(tmp_path)
    _edit(root, RL, ("sampling.max_tokens", 0))
    assert main(["--preset", "qwen3_8b", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"{RL}: invalid RlConfig" in err and "sampling.max_tokens" in err
    assert main(["--preset", "nonesuch"]) == 2
    assert "no preset 'nonesuch'" in capsys.readouterr().err


def _trained_model(run_dir: Path, max_answer_tokens: int) -> Path:
    """A model folder with only what the start-up check reads: config.json and gr2_rerank.json."""
    model = run_dir / "models" / "sft_reject"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    prompt = RerankPromptSection(history_token_budget=400, max_title_chars=80)
    lengths = RerankLengths(max_answer_tokens=max_answer_tokens, teacher_max_tokens=max_answer_tokens)
    (model / RERANK_SETTINGS).write_text(json.dumps(rerank_settings_json(prompt, "<|im_end|>", lengths)))
    return model


def test_serving_refuses_a_reranker_config_shorter_than_the_model_was_trained_for(tmp_path):
    _trained_model(tmp_path, max_answer_tokens=512)
    tiny = REPO_ROOT / "serving" / "configs" / "tiny.yaml"
    unconstrained = [f"run_dir={tmp_path}", "reranker.sampling.constrained=false"]
    cfg = load_serve_config(tiny, [*unconstrained, "reranker.sampling.max_tokens=256"])
    expected = (r"serving reranker.sampling.max_tokens=256 < .*models/sft_reject/gr2_rerank.json "
                r"lengths.max_answer_tokens=512 \(trained on\)")
    with pytest.raises(ConfigError, match=expected):
        cfg.reranker_settings()
    from serving.app import build_app

    with pytest.raises(ConfigError, match=expected):  # `serve run` / `python -m serving` stop before any replica
        build_app(cfg.model_dump(mode="json"))
    ok = load_serve_config(tiny, [*unconstrained, "reranker.sampling.max_tokens=512"]).reranker_settings()
    assert ok.lengths.max_answer_tokens == 512 and ok.prompt.history_token_budget == 400
    too_short = load_serve_config(tiny, [*unconstrained, "reranker.sampling.max_tokens=512",
                                         "reranker.engine.max_model_len=1024"])
    with pytest.raises(ConfigError, match=r"serving reranker.engine.max_model_len=1024 < prompt ~1110"):
        too_short.reranker_settings()
