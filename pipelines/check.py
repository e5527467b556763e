"""Check a preset's configs against each other before anything runs: length budgets, the shared prompt, eos tokens,
resources and paths.

Loads every stage YAML of `pipelines/configs/<preset>/` with the stage's own config class, and
`serving/configs/<preset>.yaml` when it exists, then checks what no single config can see:

- lengths: the teacher's engine holds its prompt + answer; SFT's max_len holds a prompt within the history budget +
  the teacher's answer budget; no later stage (rl, evaluate, serving) allows fewer answer tokens than the traces
  trained the model to write, and each engine's max_model_len holds prompt + answer (rec.rerank_settings.check_lengths, the
  function the stages run at start-up against a model's gr2_rerank.json); RL's overlong buffer is below its
  max_tokens. Prompt lengths are estimated from the config (rec.rerank_settings.prompt_token_estimate: the history budget +
  a documented allowance per candidate line and for the template);
- the prompt sections (history_token_budget, max_title_chars, priming, chat_template_kwargs) and eos tokens of
  traces, sft, rl, evaluate and the serving re-ranker are equal (SFT's is saved with the model; the others are what
  a model without gr2_rerank.json is prompted with);
- resources: GPUs per engine = its tensor_parallel_size, CPU engines eager with an explicit KV cache, a local Ray's
  num_cpus large enough for the actors it must hold;
- paths: one run_dir for every stage, the dataset folder exists, model paths name a stage's output.

It prints a table of what it checked and exits 1 naming both fields (file + dotted field) of every contradiction,
2 when a file does not load. It reads only the YAML files: no storage, model or GPU is touched.

Local:    python -m pipelines.check --preset qwen3_8b        (also: tiny, tiny_full)
          python -m pipelines.check --preset qwen3_8b --root /path/to/a/copy   (files under <root>/pipelines/...)
Cluster:  nothing to submit; run it in CI or before `ray job submit`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipelines.common import REPO_ROOT
from rec.config import ConfigError, load_config
from rec.rerank import RerankPromptSection, RerankSamplingSection
from rec.rerank_settings import (
    DEFAULT_CANDIDATES,
    STUDENT_SID_TOKENS,
    TEXT_SID_TOKENS,
    RerankSettings,
    answer_token_budget,
    check_lengths,
    prompt_token_estimate,
    trained_lengths,
)

PROMPT_FIELDS = ("history_token_budget", "max_title_chars", "priming", "chat_template_kwargs")
MODEL_WRITERS = ("midtrain", "sft", "rl")
"""Stages that write a model folder `models/<stage>...`; a relative model path must name one."""


def stage_classes() -> dict[str, type[BaseModel]]:
    """Stage name -> its config class (imported here: a stage module may import torch)."""
    from pipelines.evaluate import EvaluateConfig
    from pipelines.midtrain import MidtrainConfig
    from pipelines.prepare import PrepareConfig
    from pipelines.prerank import PrerankConfig
    from pipelines.rl import RlConfig
    from pipelines.sft import SftConfig
    from pipelines.sid import SidConfig
    from pipelines.traces import TracesConfig

    return {"prepare": PrepareConfig, "sid": SidConfig, "midtrain": MidtrainConfig, "prerank": PrerankConfig,
            "traces": TracesConfig, "sft": SftConfig, "rl": RlConfig, "evaluate": EvaluateConfig}


@dataclass
class Report:
    """Rows of the table (status, check, detail) and the contradictions found."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, check: str, problems: list[str], detail: str) -> None:
        self.rows.append(("FAIL" if problems else "ok", check, "; ".join(problems) if problems else detail))
        self.problems += [p for p in problems if p not in self.problems]  # two models, one contradiction

    def table(self) -> str:
        width = max(len(check) for _, check, _ in self.rows)
        return "\n".join(f"{status:<4}  {check:<{width}}  {detail}" for status, check, detail in self.rows)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "...'"


def _is_trained(path: str | None) -> bool:
    """Whether a model path names a re-ranker trained on the traces (an SFT model, or RL on top of one)."""
    name = Path(path or "").name
    return name.startswith("sft") or name.startswith("rl")


class PresetCheck:
    """The checks over one preset's loaded configs; `files` names each stage's file as messages show it."""

    def __init__(self, configs: dict[str, Any], files: dict[str, str], serve: Any | None, serve_file: str | None):
        self.c, self.files, self.serve, self.serve_file = configs, files, serve, serve_file
        self.report = Report()
        prerank = configs.get("prerank")
        self.candidates = prerank.top_n if prerank is not None else DEFAULT_CANDIDATES

    def f(self, stage: str) -> str:
        return self.files.get(stage, self.serve_file or "serving")

    # --- lengths ----------------------------------------------------------------------------------------------
    def trained(self) -> RerankSettings | None:
        """The settings SFT saves with the model, derived from the configs: SFT's prompt, the teacher's budget."""
        traces, sft = self.c.get("traces"), self.c.get("sft")
        if sft is not None and sft.source == "promoted":  # written answers: the ranking alone, no teacher
            return RerankSettings(
                sft.prompt, sft.eos_token,
                trained_lengths(RerankSamplingSection(constrained=True, max_explanation_tokens=0),
                                candidates=self.candidates),
                source=self.f("sft"), trained_field=f"{self.f('sft')} source=promoted -> constrained answer tokens")
        if traces is None or sft is None:
            return None
        s = traces.sampling
        field_name = ("sampling.max_tokens" if not s.constrained
                      else f"sampling.max_explanation_tokens={s.max_explanation_tokens} -> constrained answer tokens")
        return RerankSettings(sft.prompt, sft.eos_token, trained_lengths(s, candidates=self.candidates),
                              source=self.f("sft"), trained_field=f"{self.f('traces')} {field_name}")

    def _reader(self, check: str, settings: RerankSettings, sampling, max_model_len: int, where: str,
                sampling_field: str, engine_field: str, candidates: int, sid_tokens: int = STUDENT_SID_TOKENS):
        problems = check_lengths(settings, sampling, max_model_len, where, sampling_field=sampling_field,
                                 engine_field=engine_field, candidates=candidates, sid_tokens=sid_tokens)
        prompt = prompt_token_estimate(settings.prompt, candidates, sid_tokens)
        answer = answer_token_budget(sampling, candidates, sid_tokens)
        trained = settings.lengths.max_answer_tokens if settings.lengths else None
        detail = (f"{engine_field}.max_model_len={max_model_len} >= prompt ~{prompt} + answer {answer}"
                  + (f"; answers up to {trained} trained" if trained else ""))
        self.report.add(check, problems, detail)

    def lengths(self) -> None:
        traces, sft, rl, evaluate = (self.c.get(s) for s in ("traces", "sft", "rl", "evaluate"))
        trained = self.trained()
        if traces is not None:
            # a hub teacher has no SID tokens: it reads each SID as ~30 BPE pieces (the tiny teacher is the student)
            sid = TEXT_SID_TOKENS if traces.teacher.model is not None else STUDENT_SID_TOKENS
            self._reader("lengths: teacher engine", RerankSettings(traces.prompt, source=self.f("traces")),
                         traces.sampling, traces.engine.max_model_len, self.f("traces"), "sampling", "engine",
                         self.candidates, sid)
        if trained is not None:
            prompt = prompt_token_estimate(sft.prompt, self.candidates)
            answer = trained.lengths.max_answer_tokens
            problems = []
            if prompt is None:
                problems.append(f"{self.f('sft')} prompt.history_token_budget is null: {self.f('sft')} max_len cannot "
                                "be shown to hold the prompts")
            elif prompt + answer > sft.max_len:
                problems.append(
                    f"{self.f('sft')} max_len={sft.max_len} < prompt ~{prompt} ({self.f('sft')} "
                    f"prompt.history_token_budget={sft.prompt.history_token_budget} + {self.candidates} candidates + "
                    f"template) + answer {answer} ({trained.answer_field}): the longest traces would be dropped; "
                    f"raise max_len to >= {prompt + answer}")
            self.report.add("lengths: sft max_len", problems,
                            f"max_len={sft.max_len} >= prompt ~{prompt} + trained answer {answer}")
        if rl is not None:
            settings = trained if trained is not None and _is_trained(rl.init_model) else RerankSettings(
                rl.prompt, source=self.f("rl"))
            self._reader("lengths: rl rollouts", settings, rl.sampling, rl.rollout.engine.max_model_len,
                         self.f("rl"), "sampling", "rollout.engine", self.candidates)
            buffer, s = rl.rl.overlong_buffer, rl.sampling
            problems = []
            if buffer and not s.constrained and buffer >= s.max_tokens:
                problems.append(f"{self.f('rl')} rl.overlong_buffer={buffer} >= {self.f('rl')} sampling.max_tokens="
                                f"{s.max_tokens}: every answer would be penalised as overlong")
            self.report.add("lengths: rl overlong buffer", problems,
                            f"penalty from {s.max_tokens - buffer} tokens" if buffer and not s.constrained else "off")
        if evaluate is not None:
            for entry in evaluate.models:
                if entry.is_prerank:
                    continue
                settings = (trained if trained is not None and _is_trained(entry.path)
                            else RerankSettings(evaluate.prompt, source=self.f("evaluate")))
                self._reader(f"lengths: evaluate {entry.name}", settings, evaluate.sampling,
                             evaluate.engine.max_model_len, self.f("evaluate"), "sampling", "engine", self.candidates)
        if self.serve is not None and self.serve.reranker.enabled:
            r = self.serve.reranker
            settings = (trained if trained is not None and _is_trained(r.model)
                        else RerankSettings(r.prompt, source=self.f("serving"), prompt_field="reranker.prompt"))
            self._reader("lengths: serving re-ranker", settings, r.sampling, r.engine.max_model_len,
                         self.f("serving"), "reranker.sampling", "reranker.engine", self.serve.ranker.top_n)

    # --- shared prompt and eos ----------------------------------------------------------------------------------
    def readers(self) -> list[tuple[str, RerankPromptSection, str, str, str]]:
        """(file, prompt section, its dotted field, eos token, its dotted field) of every stage that prompts."""
        out = []
        for stage in ("traces", "rl", "evaluate"):
            if (cfg := self.c.get(stage)) is not None:
                eos, eos_field = ((cfg.teacher.eos_token, "teacher.eos_token") if stage == "traces"
                                  else (cfg.eos_token, "eos_token"))
                out.append((self.f(stage), cfg.prompt, "prompt", eos, eos_field))
        if self.serve is not None and self.serve.reranker.enabled:
            r = self.serve.reranker
            out.append((self.f("serving"), r.prompt, "reranker.prompt", r.eos_token, "reranker.eos_token"))
        return out

    def prompts(self) -> None:
        sft = self.c.get("sft")
        if sft is None:
            return
        for name in PROMPT_FIELDS:
            ref = getattr(sft.prompt, name)
            problems = [f"{file} {where}.{name}={_short(getattr(prompt, name))} != {self.f('sft')} prompt.{name}="
                        f"{_short(ref)}" for file, prompt, where, _, _ in self.readers()
                        if getattr(prompt, name) != ref]
            self.report.add(f"prompt: {name}", problems, f"{_short(ref)} in every stage")
        problems = [f"{file} {where}={eos!r} != {self.f('sft')} eos_token={sft.eos_token!r}"
                    for file, _, _, eos, where in self.readers() if eos != sft.eos_token]
        self.report.add("eos tokens", problems, f"{sft.eos_token!r} in every stage")

    # --- resources -------------------------------------------------------------------------------------------------
    def engines(self) -> list[tuple[str, str, Any, float, str]]:
        """(file, engine field, EngineSection, GPUs per engine, that field) of every vLLM engine."""
        out = []
        for stage in ("prerank", "traces", "evaluate"):
            if (cfg := self.c.get(stage)) is not None:
                out.append((self.f(stage), "engine", cfg.engine, cfg.gpus_per_actor, "gpus_per_actor"))
        if (rl := self.c.get("rl")) is not None:
            out.append((self.f("rl"), "rollout.engine", rl.rollout.engine, rl.rollout.gpus_per_actor,
                        "rollout.gpus_per_actor"))
        if self.serve is not None:
            for name in ("ranker", "reranker"):
                section = getattr(self.serve, name)
                if name == "ranker" or section.enabled:
                    out.append((self.f("serving"), f"{name}.engine", section.engine, section.num_gpus,
                                f"{name}.num_gpus"))
        return out

    def resources(self) -> None:
        problems = []
        for file, where, engine, gpus, gpus_field in self.engines():
            tp = int(engine.extra.get("tensor_parallel_size", 1))
            tp_field = f"{file} {where}.extra.tensor_parallel_size={tp}"
            if gpus == 0:
                if tp > 1:
                    problems.append(f"{tp_field} on a CPU engine ({file} {gpus_field}=0)")
                if engine.kv_cache_memory_bytes is None:
                    problems.append(f"{file} {where}.kv_cache_memory_bytes=null with {file} {gpus_field}=0: CPU "
                                    "engines need an explicit KV cache size")
                if not engine.enforce_eager:
                    problems.append(f"{file} {where}.enforce_eager=false with {file} {gpus_field}=0: CPU engines "
                                    "need eager mode")
            elif (gpus >= 1 or tp > 1) and gpus != tp:
                problems.append(f"{file} {gpus_field}={gpus:g} != {tp_field}: an engine shards over exactly the "
                                "GPUs its actor holds")
        for stage in ("prerank", "traces", "evaluate"):
            cfg = self.c.get(stage)
            if cfg is not None and cfg.num_cpus is not None:
                needed = math.ceil(cfg.actors * cfg.cpus_per_actor) + 1  # pipelines.common.local_cpus
                if cfg.num_cpus < needed:
                    problems.append(f"{self.f(stage)} num_cpus={cfg.num_cpus} < {self.f(stage)} actors x "
                                    f"cpus_per_actor ({cfg.actors} x {cfg.cpus_per_actor:g}) + 1 for Ray Data")
        rl = self.c.get("rl")
        if rl is not None and rl.num_cpus is not None:
            held = math.ceil(rl.rollout.actors * rl.rollout.cpus_per_actor
                             + rl.train.num_workers * rl.train.cpus_per_worker)
            if rl.num_cpus < held:
                problems.append(f"{self.f('rl')} num_cpus={rl.num_cpus} < {self.f('rl')} rollout.actors x "
                                f"rollout.cpus_per_actor + train.num_workers x train.cpus_per_worker ({held}): the "
                                "trainers would wait for CPUs the rollout actors hold")
        self.report.add("resources", problems, f"{len(self.engines())} engines: GPUs = tensor_parallel_size, CPU "
                        "engines eager with a KV cache size; local Ray num_cpus large enough")

    # --- paths -----------------------------------------------------------------------------------------------------
    def paths(self, root: Path) -> None:
        problems = []
        run_dirs = {stage: cfg.run_dir for stage, cfg in self.c.items()}
        ref_stage = next(iter(run_dirs), None)
        for stage, run_dir in run_dirs.items():
            if run_dir != run_dirs[ref_stage]:
                problems.append(f"{self.f(stage)} run_dir={run_dir!r} != {self.f(ref_stage)} "
                                f"run_dir={run_dirs[ref_stage]!r}")
        if self.serve is not None and self.serve.run_dir is not None and ref_stage is not None \
                and self.serve.run_dir != run_dirs[ref_stage]:
            problems.append(f"{self.f('serving')} run_dir={self.serve.run_dir!r} != {self.f(ref_stage)} "
                            f"run_dir={run_dirs[ref_stage]!r}")
        if (prepare := self.c.get("prepare")) is not None and "://" not in prepare.dataset_dir:
            path = Path(prepare.dataset_dir)
            if not (path.is_absolute() and path.is_dir()) and not (root / path).is_dir() \
                    and not (REPO_ROOT / path).is_dir():
                problems.append(f"{self.f('prepare')} dataset_dir={prepare.dataset_dir!r}: no such folder")
        models = []
        if (rl := self.c.get("rl")) is not None:
            models.append((self.f("rl"), "init_model", rl.init_model))
        if (evaluate := self.c.get("evaluate")) is not None:
            models += [(self.f("evaluate"), f"models.{n}.path", m.path) for n, m in enumerate(evaluate.models)
                       if not m.is_prerank]
        if self.serve is not None:
            models.append((self.f("serving"), "ranker.model", self.serve.ranker.model))
            if self.serve.reranker.enabled:
                models.append((self.f("serving"), "reranker.model", self.serve.reranker.model))
        for file, where, path in models:
            parts = path.split("/")
            if not path.startswith("/") and (len(parts) != 2 or parts[0] != "models"
                                             or not parts[1].startswith(MODEL_WRITERS)):
                problems.append(f"{file} {where}={path!r} names no stage output (models/<midtrain|sft_*|rl*>) "
                                "under run_dir")
        self.report.add("paths", problems, f"one run_dir ({run_dirs.get(ref_stage)!r}), dataset folder found, "
                        f"{len(models)} model paths name stage outputs")

    def run(self, root: Path) -> Report:
        self.lengths()
        self.prompts()
        self.resources()
        self.paths(root)
        return self.report


def load_preset(preset: str, root: Path = REPO_ROOT) -> tuple[dict[str, Any], dict[str, str], Any, str | None]:
    """(stage -> config, stage -> file as shown, serving config or None, its file) of a preset under `root`;
    a ConfigError names the file that does not load."""
    from serving.config import load_serve_config

    folder = root / "pipelines" / "configs" / preset
    if not folder.is_dir():
        known = sorted(p.name for p in (root / "pipelines" / "configs").iterdir() if p.is_dir())
        raise ConfigError(f"no preset {preset!r}: {folder} is not a folder (presets: {', '.join(known)})")
    classes = stage_classes()
    unknown = sorted(p.name for p in folder.glob("*.yaml") if p.stem not in classes)
    missing = [f"{stage}.yaml" for stage in classes if not (folder / f"{stage}.yaml").is_file()]
    if unknown or missing:
        raise ConfigError(f"{folder}: " + "; ".join(
            ([f"no stage named {', '.join(unknown)} (stages: {', '.join(classes)})"] if unknown else [])
            + ([f"no {', '.join(missing)}"] if missing else [])))
    configs, files = {}, {}
    for stage, cls in classes.items():  # pipeline order: prepare (the run_dir every later stage must share) first
        configs[stage] = load_config(cls, folder / f"{stage}.yaml")
        files[stage] = str((folder / f"{stage}.yaml").relative_to(root))
    serve_path = root / "serving" / "configs" / f"{preset}.yaml"
    if not serve_path.is_file():
        return configs, files, None, None
    return configs, files, load_serve_config(serve_path), str(serve_path.relative_to(root))


def check_preset(preset: str, root: Path = REPO_ROOT) -> Report:
    configs, files, serve, serve_file = load_preset(preset, root)
    return PresetCheck(configs, files, serve, serve_file).run(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="a folder of pipelines/configs/ (tiny, tiny_full, qwen3_8b)")
    parser.add_argument("--root", default=str(REPO_ROOT),
                        help="folder holding pipelines/configs/ and serving/configs/ (default: this repository)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        report = check_preset(args.preset, root)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"preset {args.preset} ({root}):")
    print(report.table())
    if report.problems:
        print(f"\n{len(report.problems)} contradiction(s):", file=sys.stderr)
        for problem in report.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
