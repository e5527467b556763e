"""The rl stage: the weight sync into a live vLLM engine, the config checks, and the real stage for a few steps
(a vLLM rollout actor and a Ray Train + DeepSpeed worker on a local Ray) with resume-or-skip on rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from beam_fixtures import make_prerank_run_dir
from prerank_candidates import write_candidates
from safetensors.torch import load_file
from test_sft import assert_tensorboard_matches

from pipelines.common import REPO_ROOT
from pipelines.rl import RlConfig, run
from rec.config import ConfigError, load_config
from rec.rerank import format_answer

TINY_YAML = REPO_ROOT / "pipelines" / "configs" / "tiny" / "rl.yaml"
# the fixture model reads 1024 positions and spends ~1 token per character of a title
SMALL = ["rollout.engine.max_model_len=1024", "rollout.engine.kv_cache_memory_bytes=67108864",
         "prompt.history_token_budget=40", "prompt.max_title_chars=16", "sampling.max_explanation_tokens=4"]


def _config(run_dir, *overrides: str) -> RlConfig:
    return load_config(RlConfig, TINY_YAML, [f"run_dir={run_dir}", *overrides])


def test_batch_shape_is_checked_and_grad_accumulation_derived():
    cfg = _config("x")
    assert cfg.grad_accum_steps == 4 and cfg.rl.reward == "conditional" and cfg.sampling.constrained
    with pytest.raises(ConfigError, match="must split evenly"):
        _config("x", "rl.samples_per_prompt=3")
    with pytest.raises(ConfigError, match="clip-higher"):
        _config("x", "rl.eps_high=0.1")
    with pytest.raises(ConfigError, match="rl.reward"):
        _config("x", "rl.reward=sometimes")


@pytest.fixture(scope="module")
def rl_run_dir(tmp_path_factory):
    run_dir = make_prerank_run_dir(tmp_path_factory.mktemp("rl") / "run", max_users=40)
    write_candidates(run_dir, rows=16, split="train")
    write_candidates(run_dir, rows=8, seed=1, split="valid")
    return run_dir


def test_out_of_process_engine_takes_pushed_weights_and_matches_hf(rl_run_dir, ray_cluster):
    """The GPU topology on CPU: the rollout engine runs in vLLM's multi-process engine inside a Ray actor, and new
    weights reach it the way the trainer sends them (`WeightPusher`, files backend: one layer group per shard, only
    file names through vLLM's RPC). Afterwards its log-probabilities of a fixed completion and its greedy
    re-rankings are the updated HF model's, and differ from before."""
    import ray

    from pipelines.rl_rollout import RolloutWorker
    from pipelines.weight_sync import PolicyWeights, WeightPusher
    from rec.engines.reranker import Reranker, RerankGenerator
    from rec.model import load_student
    from rec.rerank import PromptBuilder, catalogue, eos_token_id
    from rec.rl import completion_logprobs, policy_batch

    model_dir = rl_run_dir.local_path("models", "midtrain")
    cfg = _config(rl_run_dir.root, *SMALL, f"init_model={model_dir}", "rollout.engine.in_process=false")
    actor = ray.remote(num_cpus=1)(RolloutWorker).remote(rl_run_dir.root, model_dir, cfg.prompt.model_dump(),
                                                          cfg.eos_token, cfg.model_dump())
    assert ray.get(actor.out_of_process.remote())
    rows = rl_run_dir.read_parquet("candidates", "train.parquet").to_pylist()[:4]
    tokenizer, model = load_student(model_dir, dtype=torch.float32)
    greedy_hf = RerankGenerator(tokenizer, eos_token_id(tokenizer, cfg.eos_token, model_dir),
                                cfg.sampling.model_copy(update={"temperature": 0.0}), model=model)
    hf = Reranker(PromptBuilder(tokenizer, *catalogue(rl_run_dir), cfg.prompt), greedy_hf,
                  cfg.rollout.engine.max_model_len)
    _, prompt_ids = hf.prompts.prompt(rows[0]["history"], rows[0]["candidates"])
    sids = hf.prompts.candidate_sids(rows[0]["candidates"])
    completion = tokenizer(format_answer("because", sids[::-1]), add_special_tokens=False)["input_ids"]
    batch = policy_batch([prompt_ids], [completion], tokenizer.pad_token_id)
    before = torch.tensor(ray.get(actor.logprobs.remote(prompt_ids, completion)))
    with torch.no_grad():
        assert torch.allclose(completion_logprobs(model, batch)[0][0], before, atol=1e-3)
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        expected = completion_logprobs(model, batch)[0][0]

    pushed = WeightPusher(cfg.rollout.weight_sync, [actor], rank=0).push(PolicyWeights(model, zero_stage=0, rank=0))
    assert pushed["tensors"] == len(dict(model.named_parameters(remove_duplicate=False)))  # tied head included
    after = torch.tensor(ray.get(actor.logprobs.remote(prompt_ids, completion)))
    assert (after - before).abs().max() > 1e-2, "the engine still answers with the old weights"
    assert torch.allclose(after, expected, atol=1e-3), (after - expected).abs().max()
    greedy = ray.get(actor.rerank.remote(rows))
    assert greedy == [r.ranking for r in hf.rerank([r["history"] for r in rows], [r["candidates"] for r in rows])]
    ray.kill(actor)


def test_stage_trains_publishes_and_skips_when_finished(rl_run_dir, tmp_path):
    import ray

    model_dir = rl_run_dir.local_path("models", "midtrain")
    overrides = [*SMALL, f"init_model={model_dir}", "max_rows=null", "insert_missing_target=false",
                 "rl.steps=2", "rl.prompts_per_step=2", "rl.samples_per_prompt=4", "rl.eval_every_steps=1",
                 "rl.eval_rows=4", "train.num_workers=1", "train.batch_size=4", "num_cpus=3"]
    cfg = _config(rl_run_dir.root, *overrides)
    try:
        report = run(cfg)
    finally:
        ray.shutdown()
    out = Path(rl_run_dir.local_path("models", "rl"))
    assert report["steps"] == 2 and (out / "config.json").is_file() and (out / "rl_curves.png").is_file()
    assert json.loads((out / "gr2_rerank.json").read_text())["prompt"]["history_token_budget"] == 40
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for record in log:
        assert record["kept_group_fraction"] > 0 and record["invalid_rate"] == 0.0  # constrained answers
        assert {"reward_mean", "identity_rate", "clip_fraction", "entropy", "response_length", "val_ndcg@5",
                "val_recall@1", "sync_s"} <= set(record)
    assert_tensorboard_matches(out, log, {"train/reward_mean", "train/identity_rate", "train/kept_group_fraction",
                                          "train/loss", "eval/val_ndcg@5", "eval/val_recall@1"})
    before, after = load_file(f"{model_dir}/model.safetensors"), load_file(out / "model.safetensors")
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before), f"unchanged: {sorted(set(before) - set(changed))}"
    assert run(cfg) == report  # finished: the rerun skips
    with pytest.raises(Exception, match="rl"):
        run(_config(rl_run_dir.root, *overrides, "rl.alpha=0.5"))  # another config into the same output


@pytest.mark.slow
def test_stage_runs_with_out_of_process_engines(tmp_path):
    """The whole tiny RL stage in the GPU topology: rollout engines in vLLM's multi-process engine, weights pushed
    through the files backend every step, the model written by the trainer."""
    import ray

    run_dir = make_prerank_run_dir(tmp_path / "run", max_users=40)
    write_candidates(run_dir, rows=16, split="train")
    write_candidates(run_dir, rows=8, seed=1, split="valid")
    model_dir = run_dir.local_path("models", "midtrain")
    cfg = _config(run_dir.root, *SMALL, f"init_model={model_dir}", "max_rows=null", "insert_missing_target=false",
                  "rl.steps=2", "rl.prompts_per_step=2", "rl.samples_per_prompt=4", "rl.eval_every_steps=1",
                  "rl.eval_rows=4", "train.num_workers=1", "train.batch_size=4", "num_cpus=3",
                  "rollout.engine.in_process=false")
    try:
        report = run(cfg)
    finally:
        ray.shutdown()
    assert report["steps"] == 2 and report["mean_sync_s"] > 0
    before, after = load_file(f"{model_dir}/model.safetensors"), load_file(Path(report["model_dir"]) / "model.safetensors")
    assert all(not torch.equal(before[name], after[name]) for name in before)


def test_nccl_weight_sync_needs_gpus():
    with pytest.raises(ConfigError, match="backend=nccl needs GPU"):
        _config("x", "rollout.weight_sync.backend=nccl")


@pytest.mark.slow
def test_a_killed_rl_run_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL the stage (driver, its local Ray, trainer and rollout actors) once a checkpoint is registered; the
    rerun resumes from it (the rollout engines get the checkpoint's weights) and ends at the asked step."""
    import subprocess
    import sys

    from stage_process import kill_when

    from pipelines.train_utils import read_trainer_state
    from rec.io import RunDir

    run_dir = make_prerank_run_dir(tmp_path / "run", max_users=40)
    write_candidates(run_dir, rows=16, split="train")
    write_candidates(run_dir, rows=8, seed=1, split="valid")
    overrides = [f"run_dir={run_dir.root}", *SMALL, f"init_model={run_dir.local_path('models', 'midtrain')}",
                 "max_rows=null", "insert_missing_target=false", "rl.prompts_per_step=2", "rl.samples_per_prompt=4",
                 "rl.eval_rows=4", "train.num_workers=1", "train.checkpoint_every_steps=2", "num_cpus=3"]
    command = [sys.executable, "-m", "pipelines.rl", "--config", str(TINY_YAML), *overrides]
    snapshot = tmp_path / "run" / "models" / "rl_ckpt" / "checkpoint_manager_snapshot.json"

    def registered() -> bool:
        return snapshot.exists() and "checkpoint_step_" in snapshot.read_text()

    kill_when([*command, "rl.steps=1000"], registered, "a first checkpoint", tmp_path / "first-run.log")
    done = subprocess.run([*command, "rl.steps=8"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = read_trainer_state(RunDir.open(run_dir.root), "models", "rl")
    assert state["step"] == 8 and state["resumed_from_step"] >= 2 and state["resumed_from_step"] % 2 == 0
    log = [json.loads(line) for line in Path(run_dir.local_path("models", "rl", "train_log.jsonl")).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
