"""The midtrain stage end to end: Ray Train + DeepSpeed ZeRO over gloo on a slice of Beauty, resume, loading.

The fast test trains a tiny model for a few steps with 2 workers (ZeRO-2) on packed rows; the slow ones cover
resuming from a checkpoint, ZeRO-3 on unpacked rows, and loading the published model in vLLM
(`pytest -m slow tests/test_midtrain.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from midtrain_fixtures import LEVELS, make_run_dir
from stage_process import kill_when
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.common import REPO_ROOT, StageOutputsMismatch
from pipelines.midtrain import (
    CKPT_NAME,
    OUTPUT,
    RESUMABLE_FIELDS,
    MidtrainConfig,
    build_student,
    causal_lm_loss,
    held_out_rows,
    run,
)
from pipelines.train_utils import check_previous, read_train_log, read_trainer_state, tokenizer_files
from rec.config import ConfigError, config_fingerprint, load_config
from rec.io import RunDir
from rec.midtrain_data import PACKING_FORMAT, SidEncoder, collate, next_item_prompt_ids
from rec.engines.sid_ranker import SidRanker
from rec.model import SidCodeTables, encode_text, sid_softmax_of, sid_token_ids

TINY_YAML = REPO_ROOT / "pipelines" / "configs" / "tiny" / "midtrain.yaml"


def _config(run_dir, *overrides: str) -> MidtrainConfig:
    return load_config(
        MidtrainConfig,
        TINY_YAML,
        [
            f"run_dir={run_dir}",
            "model.tokenizer_vocab_size=600",
            "data.seq_len=128",
            "data.max_text_tokens=32",
            "train.batch_size=4",
            "train.lr=0.005",
            "train.warmup_steps=1",
            "train.log_every_steps=2",
            "train.checkpoint_every_steps=100",
            "train.shuffle_buffer_rows=0",
            *overrides,
        ],
    )


def _published(run_dir):
    path = run_dir.local_path(*OUTPUT)
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def test_tiny_preset_config_loads_and_checks_its_fields():
    cfg = load_config(MidtrainConfig, TINY_YAML, ["run_dir=runs/x"])
    assert cfg.model.head_dim == 64 and cfg.train.zero_stage == 2 and cfg.train.num_workers == 2
    assert cfg.train.deepspeed_config()["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ConfigError, match="unknown tasks"):
        load_config(MidtrainConfig, TINY_YAML, ["run_dir=runs/x", "data.weights.general_text=1"])
    with pytest.raises(ConfigError, match="bf16 needs use_gpu"):
        load_config(MidtrainConfig, TINY_YAML, ["run_dir=runs/x", "train.precision=bf16"])
    with pytest.raises(ConfigError, match="num_kv_heads"):
        load_config(MidtrainConfig, TINY_YAML, ["run_dir=runs/x", "model.num_kv_heads=3"])
    with pytest.raises(ConfigError, match="sid_softmax: level needs train.zero_stage <= 2"):
        load_config(MidtrainConfig, TINY_YAML, ["run_dir=runs/x", "sid_softmax=level", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match="sid_softmax"):
        load_config(MidtrainConfig, TINY_YAML, ["run_dir=runs/x", "sid_softmax=codes"])


def test_midtrain_two_workers_zero2_trains_and_publishes(tmp_path, ray_cluster):
    run_dir = make_run_dir(tmp_path / "run", max_users=80)
    cfg = _config(tmp_path / "run", "train.max_steps=8", "train.num_workers=2", "train.zero_stage=2",
                  "sid_softmax=level", "data.next_item_markers=false", "held_out.users=16",
                  "held_out.every_steps=3")
    report = run(cfg)
    assert report["steps"] == 8 and report["resumed_from_step"] is None and report["tokens"] > 0
    # next-item labels are the codes only: `levels` per target, no <|sid_begin|> / <|sid_end|>
    sequences = run_dir.read_parquet("data", "train.parquet").column("item_ids").to_pylist()
    targets = sum(max(len(items) - 1, 0) for items in sequences) * int(cfg.data.weights["next_item"])  # passes
    assert report["mixture"]["next_item"]["loss_tokens"] == LEVELS * targets, report["mixture"]
    history = read_train_log(run_dir, *OUTPUT)
    # logged every 2 steps, the held-out loss every 3 and at the last step
    assert [r["step"] for r in history] == [2, 3, 4, 6, 8]
    assert [r["step"] for r in history if "eval_loss" in r] == [3, 6, 8]
    assert history[-1]["loss"] < history[0]["loss"] - 0.3, history
    held_out = report["held_out"]
    assert held_out["users"] == 16 and held_out["steps"] == [3, 6, 8] and held_out["last_step"] == 8
    assert held_out["best_loss"] == min(held_out["loss"]) and held_out["last_loss"] == held_out["loss"][-1]

    path, tokenizer, model = _published(run_dir)
    files = tokenizer_files(tokenizer)
    initial = build_student(cfg.model, files, cfg.seed, sid_softmax=cfg.sid_softmax)
    unchanged = [
        name for (name, before), after in zip(initial.named_parameters(), model.parameters())
        if torch.equal(before, after)
    ]
    assert not unchanged, f"parameters not trained: {unchanged}"
    assert model.config.head_dim == 64 and model.config.vocab_size == len(tokenizer)
    # the SID softmax travels in config.json, and the ranker over the model scores the way it was trained
    assert sid_softmax_of(model.config) == "level" and sid_softmax_of(initial.config) == "level"
    assert sid_softmax_of(build_student(cfg.model, files, cfg.seed, sid_softmax="vocab").config) == "vocab"
    sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
    ranker = SidRanker(tokenizer, sid_map["item_id"], sid_map["codes"], 16, num_beams=4, top_n=2, max_model_len=128,
                       model=model)
    assert ranker.decoding.sid_softmax == "level"
    # the last held-out loss is the published model's mean code loss on the valid targets, computed here in one batch
    rows = held_out_rows(cfg, run_dir, tokenizer, sid_map, 16)
    assert len(rows) == 16 and all(sum(label != -100 for label in row["labels"]) == LEVELS for row in rows)
    codes = SidCodeTables.of(sid_token_ids(tokenizer, LEVELS, 16), len(tokenizer))
    with torch.no_grad():
        loss, _ = causal_lm_loss(model, collate(rows, tokenizer.pad_token_id), sid_codes=codes)
    assert float(loss) == pytest.approx(held_out["last_loss"], abs=1e-5)

    # the published model scores a next-item prompt built the way the pre-ranker will build it
    sid_map = run_dir.read_parquet("sid", "sid_map.parquet").to_pydict()
    encoder = SidEncoder(tokenizer, sid_map["item_id"], sid_map["codes"], codebook_size=16)
    history_items = run_dir.read_parquet("data", "test.parquet").to_pylist()[0]["history"]
    ids = torch.tensor([next_item_prompt_ids(encoder, history_items, max_len=128) + [encoder.sid_begin]])
    logits = model(input_ids=ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert encode_text(tokenizer, "Brand:")  # the tokenizer travelled with the model

    # a rerun with the same config finds the finished model and does nothing
    assert run(cfg) == report

    # checkpoints of rows packed the old way (attending across examples; no packing_format) are not resumed
    assert report["config"]["packing_format"] == PACKING_FORMAT
    marker = ("models", CKPT_NAME, "fingerprint.json")
    old_format = {k: v for k, v in run_dir.read_json(*marker).items() if k != "packing_format"}
    run_dir.write_json(old_format, *marker)
    with pytest.raises(StageOutputsMismatch, match=r"fields differ: packing_format\)"):
        run(cfg)


@pytest.mark.slow
def test_rerun_resumes_from_the_latest_checkpoint_exactly(tmp_path, ray_cluster):
    # a constant lr keeps the schedule of the first 4 steps independent of max_steps, so the resumed run and an
    # uninterrupted one must end with the same weights (model, Adam moments and data position all restored)
    fixed = ("train.checkpoint_every_steps=4", "train.lr_schedule=constant")
    resumed_dir = make_run_dir(tmp_path / "resumed", max_users=80)
    first = run(_config(tmp_path / "resumed", "train.max_steps=4", *fixed))
    assert first["steps"] == 4
    second = run(_config(tmp_path / "resumed", "train.max_steps=8", *fixed))
    assert second["resumed_from_step"] == 4 and second["steps"] == 8
    assert read_trainer_state(resumed_dir, *OUTPUT)["resumed_from_step"] == 4
    # the log continues the first run's: steps 2 and 4 came from it, 6 and 8 from the resumed run
    assert [r["step"] for r in read_train_log(resumed_dir, *OUTPUT)] == [2, 4, 6, 8]

    straight_dir = make_run_dir(tmp_path / "straight", max_users=80)
    run(_config(tmp_path / "straight", "train.max_steps=8", *fixed))
    resumed = AutoModelForCausalLM.from_pretrained(resumed_dir.local_path(*OUTPUT)).state_dict()
    straight = AutoModelForCausalLM.from_pretrained(straight_dir.local_path(*OUTPUT)).state_dict()
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    assert [r["loss"] for r in read_train_log(resumed_dir, *OUTPUT)] == [
        r["loss"] for r in read_train_log(straight_dir, *OUTPUT)
    ]


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_first_checkpoint(tmp_path):
    """SIGKILL the whole stage (driver, its local Ray, the workers) once a checkpoint is registered; rerun."""
    run_dir = make_run_dir(tmp_path / "run", max_users=80)
    overrides = [f"{k}={v}" for k, v in {"run_dir": tmp_path / "run", "model.tokenizer_vocab_size": 600,
                                          "data.seq_len": 128, "train.batch_size": 4, "train.log_every_steps": 2,
                                          "train.checkpoint_every_steps": 3}.items()]
    command = [sys.executable, "-m", "pipelines.midtrain", "--config", str(TINY_YAML), *overrides]
    snapshot = tmp_path / "run" / "models" / "midtrain_ckpt" / "checkpoint_manager_snapshot.json"

    def registered() -> bool:  # Ray Train has registered a checkpoint in storage
        return snapshot.exists() and "checkpoint_step_" in snapshot.read_text()

    kill_when([*command, "train.max_steps=1000"], registered, "a first checkpoint", tmp_path / "first-run.log")
    assert not (tmp_path / "run" / "models" / "midtrain").exists()
    done = subprocess.run([*command, "train.max_steps=12"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = read_trainer_state(run_dir, *OUTPUT)
    assert state["step"] == 12 and state["resumed_from_step"] >= 3 and state["resumed_from_step"] % 3 == 0


@pytest.mark.slow
def test_midtrain_zero3_unpacked_and_vllm_loads_the_model(tmp_path, ray_cluster):
    run_dir = make_run_dir(tmp_path / "run", max_users=60)
    report = run(_config(tmp_path / "run", "train.max_steps=4", "train.zero_stage=3", "data.packing=false"))
    # one padded example per row; its fingerprint has no packing format
    assert report["rows"] == sum(task["examples"] for task in report["mixture"].values())
    assert "packing_format" not in report["config"]
    path, tokenizer, model = _published(run_dir)
    prompt = encode_text(tokenizer, "Item: Lipstick")
    # min tokens: both engines suppress the stop tokens for 8 steps, so an early stop cannot hide a mismatch
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = generated[0, len(prompt):].tolist()
    script = textwrap.dedent(
        f"""
        import json
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        llm = LLM(model={path!r}, dtype="float32", enforce_eager=True, max_model_len=512,
                  kv_cache_memory_bytes=256 * 2**20, distributed_executor_backend="uni")
        out = llm.generate([TokensPrompt(prompt_token_ids={prompt!r})],
                           SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0))
        print("RESULT", json.dumps(list(out[0].outputs[0].token_ids)))
        """
    )
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="0")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    assert json.loads(lines[0][len("RESULT "):]) == expected


def test_a_different_config_refuses_to_resume(tmp_path):
    make_run_dir(tmp_path / "run", max_users=20)
    run_dir = RunDir.open(str(tmp_path / "run"))
    first = _config(tmp_path / "run")
    check_previous("midtrain", run_dir, CKPT_NAME, OUTPUT, config_fingerprint(first, exclude=RESUMABLE_FIELDS), False)
    with pytest.raises(StageOutputsMismatch, match=r"fields differ: codebook_size, inputs, model, packing_format\)"):
        run(_config(tmp_path / "run", "model.hidden_size=64"))
    assert run_dir.exists("models", "midtrain_ckpt", "fingerprint.json")
