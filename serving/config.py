"""The serving config: what `serving/configs/<preset>.yaml` holds under `applications[0].args`.

A preset file is a Ray Serve config file (`serve run` / `serve deploy` read it as is): `http_options`, and one
application whose `import_path` is `serving.app:build_app` and whose `args` are the fields of `ServeConfig` below.
`python -m serving --config <file> [key=value ...]` reads the same file, applies the overrides to `args` and
starts the app locally. Resources (replicas, CPUs, GPUs) are config fields; Serve's own `deployments:` section of
the file may still override them per deployment, as Serve documents.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from pipelines.common import EngineSection
from rec.config import ConfigError, Section, validate_config
from rec.rerank import RerankPromptSection, RerankSamplingSection
from rec.rerank_settings import RerankSettings, checked_model_settings

RUN_DIR_ENV = "GR2_RUN_DIR"


class ReplicaSection(Section):
    """How one deployment is replicated and what each replica gets."""

    num_replicas: int = Field(default=1, ge=1)
    """Replicas when `autoscaling` is null."""
    autoscaling: dict[str, Any] | None = None
    """Serve's autoscaling_config, e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}."""
    num_cpus: float = Field(default=1.0, ge=0)
    """Logical CPUs per replica; on CPU also the number of cores its engine is bound to (rounded, at least 1)."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs per replica (the engine's tensor_parallel_size on GPUs)."""
    max_ongoing_requests: int = Field(default=32, ge=1)
    """Requests a replica holds at once (queued for its batch or running); must be >= max_batch_size."""
    health_check_period_s: float = Field(default=10.0, gt=0)
    """How often Serve's controller checks each replica: a dead replica is replaced at most this long after it died
    (Serve's default 10 s; the tiny preset checks every 2 s)."""
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    """A replica that does not answer the controller's check within this is replaced (Serve's default)."""

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests,
                                   "health_check_period_s": self.health_check_period_s,
                                   "health_check_timeout_s": self.health_check_timeout_s,
                                   "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling
        else:
            options["num_replicas"] = self.num_replicas
        return options


class BatchedSection(ReplicaSection):
    """A model deployment: replicas, its vLLM engine, and Serve's request batching."""

    engine: EngineSection = Field(default_factory=EngineSection)
    """vLLM engine arguments (one engine per replica)."""
    bind_cores: bool = True
    """CPU replicas bind their engine to cores of their own (as the pipeline actors do)."""
    max_batch_size: int = Field(default=16, ge=1)
    """Requests served by one engine call (@serve.batch); 1 turns batching off."""
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    """How long a batch waits to fill before it runs."""

    @model_validator(mode="after")
    def _check_batch(self) -> BatchedSection:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches never fill")
        return self


class RankerSection(BatchedSection):
    model: str = "models/midtrain"
    """The mid-trained checkpoint; a path not starting with `/` is under the run dir."""
    backend: Literal["torch", "vllm", "hf"] = "torch"
    """torch: the batched beam search on the model (rec.beam_torch; the replica's GPU when it has one); vllm: a
    Python-driven beam over a vLLM engine; hf: HF generate with the vectorised trie processor (the reference)."""
    num_beams: int = Field(default=20, ge=1)
    """Beam width of the constrained search."""
    top_n: int = Field(default=10, ge=1)
    """Candidates per request (the largest `k` a request may ask for)."""
    exclude_history: bool = True
    """Never propose an item already in the request's history."""

    @model_validator(mode="after")
    def _check_beams(self) -> RankerSection:
        if self.top_n > self.num_beams:
            raise ValueError(f"top_n ({self.top_n}) must be <= num_beams ({self.num_beams})")
        return self


class ReRankerSection(BatchedSection):
    max_batch_size: int = Field(default=16, ge=1)
    """Requests the replica's engine decodes together (vLLM's max_num_seqs). The engine batches continuously: a
    request joins the running batch at the next step and leaves it when its answer ends; more wait in the engine's
    queue (and are aborted at their deadline too). 1 turns batching off."""
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    """Not used by the ReRanker: no request waits for a batch to fill (continuous batching). Accepted so that
    Serve config files written for the batched ReRanker still load."""
    enabled: bool = True
    """False serves the pre-rank order only (no re-ranker replica is started)."""
    model: str = "models/sft_reject"
    """A re-ranker checkpoint (SFT or RL); a path not starting with `/` is under the run dir."""
    prompt: RerankPromptSection = Field(default_factory=RerankPromptSection)
    """Prompt settings for a model without `gr2_rerank.json` (the SFT stage writes one; it wins)."""
    sampling: RerankSamplingSection = Field(default_factory=lambda: RerankSamplingSection(temperature=0.0))
    """Greedy by default."""
    eos_token: str = "<|im_end|>"
    """Token that ends an answer, unless the model's gr2_rerank.json names another."""

    @model_validator(mode="after")
    def _check_engine(self) -> ReRankerSection:
        if self.engine.in_process:
            raise ValueError("engine.in_process is true, but the ReRanker runs vLLM's async engine, whose engine core "
                             "always runs in a child process: set it to null")
        if "max_num_seqs" in self.engine.extra:
            raise ValueError("engine.extra.max_num_seqs: the ReRanker sets it from max_batch_size; set that instead")
        return self


class IngressSection(ReplicaSection):
    num_cpus: float = Field(default=0.1, ge=0)
    """Logical CPUs per ingress replica (it only routes and formats)."""
    max_ongoing_requests: int = Field(default=256, ge=1)
    default_budget_ms: int = Field(default=2000, ge=1)
    """Latency budget of a request that sends none: past it the pre-rank order is returned."""
    max_budget_ms: int = Field(default=60000, ge=1)
    """Largest budget a request may ask for."""
    max_history_items: int = Field(default=200, ge=1)
    """Longer histories keep their most recent items (the prompts cut further to the models' token budgets)."""
    max_body_bytes: int = Field(default=65536, ge=256)
    """Larger request bodies get 413."""
    cold_start: Literal["popular", "reject"] = "popular"
    """An empty history gets the most popular training items (`popular`) or a 422 (`reject`)."""
    reply_reserve_ms: int = Field(default=100, ge=0)
    """Part of every budget kept for formatting and sending the answer: the ingress stops waiting on the models this
    long before the request's deadline (counted from its arrival), so that the answer arrives within the budget."""
    probe_timeout_s: float = Field(default=2.0, gt=0)
    """A model deployment that failed a call with an unavailable-replica error, or left a call unanswered and then a
    cheap probe (`ping`) unanswered this long, counts as unavailable until a probe answers: meanwhile requests do not
    wait on it (503 for the Ranker, `fallback: reranker_unavailable` for the ReRanker)."""
    retry_after_s: int = Field(default=2, ge=1)
    """Retry-After (seconds) of the 503 sent while the Ranker is unavailable."""


class ServeConfig(Section):
    run_dir: str | None = None
    """The run directory the stages wrote (data/, sid/, models/); null reads $GR2_RUN_DIR."""
    seed: int = 0
    """Engine seed (sampling, if the re-ranker samples)."""
    ranker: RankerSection = Field(default_factory=RankerSection)
    reranker: ReRankerSection = Field(default_factory=ReRankerSection)
    ingress: IngressSection = Field(default_factory=IngressSection)

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.ingress.max_budget_ms < self.ingress.default_budget_ms:
            raise ValueError(f"ingress.max_budget_ms ({self.ingress.max_budget_ms}) is below default_budget_ms "
                             f"({self.ingress.default_budget_ms})")
        if self.ingress.reply_reserve_ms >= self.ingress.default_budget_ms:
            raise ValueError(f"ingress.reply_reserve_ms ({self.ingress.reply_reserve_ms}) must be below "
                             f"default_budget_ms ({self.ingress.default_budget_ms}), or no request has time left "
                             "for the models")
        return self

    def resolved_run_dir(self) -> str:
        run_dir = self.run_dir or os.environ.get(RUN_DIR_ENV)
        if not run_dir:
            raise ConfigError(f"run_dir is null and ${RUN_DIR_ENV} is not set: name the run directory the stages "
                              "wrote (run_dir=runs/tiny)")
        return run_dir

    def model_path(self, path: str) -> str:
        """A model path of this config as a local directory (relative paths are under the run dir)."""
        if path.startswith("/"):
            return path
        run_dir = self.resolved_run_dir()
        if "://" in run_dir:
            raise ConfigError(f"model path {path!r} is relative but run_dir {run_dir} is not local: give the "
                              "checkpoint's path on a mount every replica sees")
        return str(Path(run_dir) / path)

    def reranker_settings(self, model: str | None = None) -> RerankSettings:
        """How the re-ranker checkpoint (`model`, default `reranker.model` resolved) is prompted: its own
        gr2_rerank.json when it has one, else `reranker.prompt`. Refused with a ConfigError naming both fields when
        `reranker.sampling` allows fewer answer tokens than the model was trained to write, or `reranker.engine`'s
        max_model_len cannot hold the prompt + answer (rec.rerank_settings.check_lengths)."""
        r = self.reranker
        return checked_model_settings(
            model or self.model_path(r.model), r.prompt, r.eos_token, r.sampling, r.engine.max_model_len, "serving",
            prompt_field="reranker.prompt", sampling_field="reranker.sampling", engine_field="reranker.engine",
            candidates=self.ranker.top_n)


def read_serve_file(path: str | Path) -> dict[str, Any]:
    """A Serve config file as a dict; an error names the file when it is not one app with our builder."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"serve config not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise ConfigError(f"{path}: expected a Serve config file with exactly one entry under `applications`")
    return doc


def load_serve_config(path: str | Path | None, overrides: list[str] | None = None) -> ServeConfig:
    """`applications[0].args` of a Serve config file (or overrides alone) plus `key=value` overrides, validated."""
    args: dict[str, Any] = {}
    if path is not None:
        args = read_serve_file(path)["applications"][0].get("args") or {}
    return validate_config(ServeConfig, args, overrides or [], f"{path}: applications[0].args" if path else None)
