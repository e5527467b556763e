"""Offline checks of the cluster layer: KubeRay manifests, the cluster-launcher config, image and version pins.

- Every manifest under cluster/ validates against the real ray.io/v1 CRD schema (tests/data/kuberay-crds/),
  read the way the API server reads it with strict field validation (`kubectl apply` defaults to
  `--validate=strict`): unknown fields are errors. A broken copy of each manifest must fail.
- Every RayJob runs an existing stage module with an existing preset, and every GPU preset of a stage has a RayJob.
- A RayJob's worker pods give exactly the GPUs (and at least the CPUs) that its stage's preset asks Ray for.
- ray_cluster.yaml passes the cluster launcher's own schema and config preparation from the installed `ray`.
- Ray versions agree everywhere: `ray.__version__`, the pyproject pin, `rayVersion`, the Docker base image.
- No credential is written into a manifest: secrets come from secretKeyRef / secretRef.

Run: .venv/bin/pytest tests/test_cluster_manifests.py -q
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray
import yaml
from pydantic import BaseModel

from rec.config import StageConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(__file__).parent / "data" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
GPU_PRESET = "qwen3_8b"


# ---------------------------------------------------------------- loading


def _load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def manifest_paths() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


@cache
def manifests() -> list[tuple[str, dict]]:
    """(label, document) for every YAML document under cluster/."""
    found = []
    for path in manifest_paths():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        for i, doc in enumerate(docs):
            found.append((f"{path.relative_to(REPO)}" + (f"#{i}" if len(docs) > 1 else ""), doc))
    return found


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(label, doc) for label, doc in manifests() if doc.get("kind") == kind]


def cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster spec(s) a manifest carries: a RayCluster's spec, a RayJob's rayClusterSpec, a RayService's
    rayClusterConfig."""
    spec = doc.get("spec", {})
    return [s for s in (spec if doc["kind"] == "RayCluster" else None,
                        spec.get("rayClusterSpec"), spec.get("rayClusterConfig")) if s]


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    for spec in cluster_specs(doc):
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"worker group {group['groupName']}", group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]


# ---------------------------------------------------------------- CRD schema -> JSON Schema


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema with the API server's strict semantics.

    - `x-kubernetes-*` extensions are dropped (int-or-string already comes with an explicit anyOf in these CRDs;
      CEL `x-kubernetes-validations` compare against the old object and cannot be checked offline);
    - `nullable: true` admits null;
    - an object with `properties` and no `additionalProperties` gets `additionalProperties: false` unless it sets
      `x-kubernetes-preserve-unknown-fields`: the API server prunes or (strict validation) rejects unknown fields.
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    crd = _load_yaml(CRD_DIR / CRD_FILES[kind])
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    """Every schema violation of a ray.io/v1 manifest as 'path: message' (empty when valid)."""
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in CRD_FILES:
        return [f"<top>: expected apiVersion ray.io/v1 and kind in {sorted(CRD_FILES)}, "
                f"got {doc.get('apiVersion')!r} {doc.get('kind')!r}"]
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message[:200]}" for e in errors)


def test_cluster_dir_has_the_expected_manifests():
    kinds = sorted(doc["kind"] for _, doc in manifests())
    assert kinds.count("RayCluster") == 1 and kinds.count("RayService") == 1, kinds
    assert len(of_kind("RayJob")) >= 2, kinds


@pytest.mark.parametrize("path", manifest_paths(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_manifest_validates_against_crd(path: Path):
    for label, doc in manifests():
        if label.split("#")[0] == str(path.relative_to(REPO)):
            assert crd_errors(doc) == [], f"{label} does not validate against its CRD"


def _set(doc: dict, dotted: str, value: Any) -> dict:
    broken = copy.deepcopy(doc)
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node = broken
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return broken


# (kind, dotted path, bad value, what the validator must name)
BREAKAGES = [
    ("RayCluster", "spec.headGroupSpec.template.spec.containers.0.imagePullPolcy", "Always", "imagePullPolcy"),
    ("RayCluster", "spec.workerGroupSpecs.0.maxReplicas", "two", "maxReplicas"),
    ("RayCluster", "spec.authOptions.mode", "password", "mode"),
    ("RayCluster", "spec.headGroupSpec.template.spec.containers.0.resources.limits.cpu", "eight", "cpu"),
    ("RayJob", "spec.shutdownAfterJobFinishes", "yes", "shutdownAfterJobFinishes"),
    ("RayJob", "spec.entryPoint", "python -m pipelines.prepare", "entryPoint"),
    ("RayService", "spec.serveConfigV2", {"applications": []}, "serveConfigV2"),
    ("RayService", "spec.rayClusterConfig.workerGroupSpecs.0.replicas", 1.5, "replicas"),
]


@pytest.mark.parametrize("kind,dotted,value,named", BREAKAGES, ids=[f"{b[0]}:{b[1].split('.')[-1]}" for b in BREAKAGES])
def test_broken_manifest_fails_validation(kind: str, dotted: str, value: Any, named: str):
    label, doc = of_kind(kind)[0]
    assert crd_errors(doc) == []
    errors = crd_errors(_set(doc, dotted, value))
    assert errors, f"{label} with {dotted}={value!r} still validates"
    assert any(named in e for e in errors), errors


def test_manifest_that_is_not_a_ray_resource_is_rejected():
    assert crd_errors({"apiVersion": "v1", "kind": "ConfigMap", "data": {}})


# ---------------------------------------------------------------- RayJobs <-> stages


def stage_config_class(module_name: str) -> type[StageConfig]:
    module = importlib.import_module(module_name)
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, StageConfig) and v.__module__ == module_name]
    assert len(classes) == 1, f"{module_name} should define exactly one StageConfig subclass, found {classes}"
    return classes[0]


def env_names(template: dict) -> set[str]:
    return {e["name"] for c in template["spec"]["containers"][:1] for e in c.get("env", [])}


@pytest.mark.parametrize("label,doc", of_kind("RayJob"), ids=[label for label, _ in of_kind("RayJob")])
def test_rayjob_runs_an_existing_stage_with_its_gpu_preset(label: str, doc: dict):
    stage = Path(label).stem
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", f"pipelines.{stage}"], f"{label}: entrypoint {argv} is not stage {stage!r}"
    assert (REPO / "pipelines" / f"{stage}.py").is_file(), f"{label}: pipelines/{stage}.py does not exist"
    assert argv[3] == "--config" and argv[4] == f"pipelines/configs/{GPU_PRESET}/{stage}.yaml", argv
    assert (REPO / argv[4]).is_file(), f"{label}: {argv[4]} does not exist"
    assert doc["metadata"]["name"] == f"gr2-{stage}"

    # Variables in the entrypoint are expanded by the submitter's shell (K8sJobMode) or the head's (HTTPMode):
    # both must define them, and the overrides must be valid keys of the stage's config.
    variables = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", doc["spec"]["entrypoint"]))
    templates = dict(pod_templates(doc))
    for where in ("submitter", "head"):
        missing = variables - env_names(templates[where])
        assert not missing, f"{label}: {where} container does not define {sorted(missing)}"
    overrides = [re.sub(r"\$\{?[A-Z_][A-Z0-9_]*\}?", "s3://bucket/run", arg) for arg in argv[5:]]
    cfg = load_config(stage_config_class(f"pipelines.{stage}"), REPO / argv[4], overrides)
    assert cfg.run_dir.startswith(("s3://", "gs://", "/")), f"{label}: run_dir {cfg.run_dir!r} is not shared storage"


def _quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity ("8", "500m", 1) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def stage_demand(cfg: StageConfig) -> tuple[float, float]:
    """(GPUs, CPUs) that the stage asks Ray for, from its config: the largest Ray Train worker group or actor pool
    (a stage runs them one after another), except sections a config lists in CONCURRENT_SECTIONS, which run at the
    same time (the RL stage's rollout actors and trainer workers) and add up."""
    concurrent = getattr(type(cfg), "CONCURRENT_SECTIONS", ())
    parts = [_largest_demand(getattr(cfg, name)) for name in concurrent]
    together = (sum(p[0] for p in parts), sum(p[1] for p in parts))
    rest = _largest_demand(cfg.model_copy(update={name: None for name in concurrent}))
    return max(together[0], rest[0]), max(together[1], rest[1])


def _largest_demand(cfg: BaseModel) -> tuple[float, float]:
    demands = [(0.0, 0.0)]
    pending: list[Any] = [cfg]
    while pending:
        section = pending.pop()
        fields = type(section).model_fields
        if {"num_workers", "use_gpu", "cpus_per_worker"} <= set(fields):
            demands.append((float(section.num_workers if section.use_gpu else 0),
                            section.num_workers * section.cpus_per_worker))
        if {"actors", "gpus_per_actor", "cpus_per_actor"} <= set(fields):
            demands.append((section.actors * section.gpus_per_actor, section.actors * section.cpus_per_actor))
        pending += [value for name in fields if isinstance(value := getattr(section, name), BaseModel)]
    return max(d[0] for d in demands), max(d[1] for d in demands)


def job_supply(doc: dict) -> tuple[float, float]:
    """(GPUs, CPUs) that a RayJob's worker pods give Ray (its heads run with num-cpus 0 or do the stage's own work)."""
    gpus = cpus = 0.0
    for group in doc["spec"]["rayClusterSpec"].get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * _quantity(limits.get("nvidia.com/gpu", 0))
        cpus += group["replicas"] * _quantity(limits["cpu"])
    return gpus, cpus


def resource_mismatches(doc: dict, cfg: StageConfig) -> list[str]:
    """Where a RayJob's pods and its stage's preset disagree: every GPU pod is used (a GPU nobody asks for is paid
    for, one too few leaves an actor pending forever), and the CPUs asked for exist."""
    (gpus, cpus), (pod_gpus, pod_cpus) = stage_demand(cfg), job_supply(doc)
    errors = []
    if doc["spec"]["rayClusterSpec"].get("workerGroupSpecs") and gpus != pod_gpus:
        errors.append(f"the preset uses {gpus:g} GPUs, the worker pods have {pod_gpus:g}")
    if pod_cpus and cpus > pod_cpus:
        errors.append(f"the preset asks for {cpus:g} CPUs, the worker pods have {pod_cpus:g}")
    return errors


def _job_config(doc: dict, extra: list[str] = ()) -> StageConfig:
    argv = shlex.split(doc["spec"]["entrypoint"])
    stage = argv[2].removeprefix("pipelines.")
    overrides = [re.sub(r"\$\{?[A-Z_][A-Z0-9_]*\}?", "s3://bucket/run", arg) for arg in argv[5:]]
    return load_config(stage_config_class(f"pipelines.{stage}"), REPO / argv[4], [*overrides, *extra])


@pytest.mark.parametrize("label,doc", of_kind("RayJob"), ids=[label for label, _ in of_kind("RayJob")])
def test_rayjob_pods_match_the_preset_resources(label: str, doc: dict):
    assert resource_mismatches(doc, _job_config(doc)) == [], label


@pytest.mark.parametrize("stage,override", [("midtrain", "train.num_workers=16"), ("prerank", "actors=8"),
                                            ("prerank", "cpus_per_actor=9"), ("sid", "embed.gpus_per_actor=0"),
                                            ("rl", "rollout.actors=5"), ("rl", "train.num_workers=2")])
def test_resource_mismatch_is_caught(stage: str, override: str):
    jobs = {Path(label).stem: doc for label, doc in of_kind("RayJob")}
    if stage not in jobs:
        pytest.skip(f"cluster/jobs/{stage}.yaml does not exist")
    assert resource_mismatches(jobs[stage], _job_config(jobs[stage])) == []
    assert resource_mismatches(jobs[stage], _job_config(jobs[stage], [override])), override


def test_every_gpu_preset_stage_has_a_rayjob():
    presets = {p.stem for p in (REPO / "pipelines" / "configs" / GPU_PRESET).glob("*.yaml")}
    stages = {s for s in presets if (REPO / "pipelines" / f"{s}.py").is_file()}
    jobs = {Path(label).stem for label, _ in of_kind("RayJob")}
    assert stages, "no GPU presets found"
    assert stages == jobs, f"stages with a {GPU_PRESET} preset {sorted(stages)} != RayJobs {sorted(jobs)}"


@pytest.mark.parametrize("preset", sorted((REPO / "pipelines" / "configs" / GPU_PRESET).glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_gpu_preset_loads_and_has_the_tiny_keys(preset: Path):
    stage = preset.stem
    if not (REPO / "pipelines" / f"{stage}.py").is_file():
        pytest.skip(f"pipelines/{stage}.py does not exist")
    cfg = load_config(stage_config_class(f"pipelines.{stage}"), preset)
    assert cfg.run_dir.startswith(("s3://", "gs://")), f"{preset}: run_dir should be shared storage"
    tiny = REPO / "pipelines" / "configs" / "tiny" / preset.name
    if tiny.is_file():
        missing = set(_load_yaml(tiny)) - set(_load_yaml(preset))
        assert not missing, f"{preset.name}: keys of the tiny preset missing from {GPU_PRESET}: {sorted(missing)}"


# ---------------------------------------------------------------- RayService


def serve_applications() -> list[dict]:
    (label, doc), = of_kind("RayService")
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return config["applications"]


def test_rayservice_serve_config_is_well_formed():
    apps = serve_applications()
    assert apps and all(re.fullmatch(r"[\w.]+:\w+", app["import_path"]) for app in apps), apps
    assert len({app["route_prefix"] for app in apps}) == len(apps)


def test_rayservice_import_path_resolves():
    """The import path is the Serve app, or an application builder that builds it from the manifest's args."""
    from ray.serve import Application

    for app in serve_applications():
        module_name, attr = app["import_path"].split(":")
        target = getattr(importlib.import_module(module_name), attr, None)
        if callable(target) and not isinstance(target, Application):
            target = target(app.get("args") or {})
        assert isinstance(target, Application), f"{app['import_path']} gives {type(target)}, not a bound Serve app"


# ---------------------------------------------------------------- versions, images, secrets


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    for req in pyproject()["project"]["dependencies"]:
        match = re.fullmatch(rf"{package}(\[[^\]]*\])?==([\w.]+)", req.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml does not pin {package}")


def dockerfile_base_image() -> str:
    (line,) = [l for l in (CLUSTER / "Dockerfile").read_text().splitlines() if l.startswith("FROM ")]
    return line.split()[1]


def test_ray_versions_agree():
    version = ray.__version__
    assert pinned("ray") == version
    for label, doc in manifests():
        for spec in cluster_specs(doc):
            assert spec.get("rayVersion") == version, f"{label}: rayVersion {spec.get('rayVersion')} != {version}"


def test_docker_base_image_matches_ray_and_python():
    image = dockerfile_base_image()
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert image == f"rayproject/ray:{ray.__version__}-{py}-gpu", image
    launcher = _load_yaml(REPO / "ray_cluster.yaml")
    assert launcher["docker"]["image"] == image, "ray_cluster.yaml runs another image than cluster/Dockerfile's base"


def test_dockerfile_installs_the_pinned_stack():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"torch=={pinned('torch')}" in text
    assert f"ray.__version__ == '{ray.__version__}'" in text, "the Dockerfile's build-time Ray check names another version"
    assert re.search(r"pip install [^\n]*-e \"?\.\[gpu\]", text), "Dockerfile must install the project with the gpu extra"


def test_all_pods_run_the_project_image():
    images = {c["image"] for _, doc in manifests() for _, t in pod_templates(doc) for c in t["spec"]["containers"]}
    version = pyproject()["project"]["version"]
    assert len(images) == 1, f"pods run different images: {sorted(images)}"
    (image,) = images
    assert image.endswith(f"/gr2-ray:{version}"), f"{image} is not the gr2-ray:{version} image of cluster/Dockerfile"


SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY|CREDENTIAL", re.I)
SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{30,}|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----")


def test_no_literal_credentials():
    for label, doc in manifests():
        for where, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "secretKeyRef" in env.get("valueFrom", {}), \
                            f"{label} {where}: {env['name']} must come from a secretKeyRef, not a literal"
                    if env["name"] == "GR2_RUN_DIR":
                        assert "configMapKeyRef" in env.get("valueFrom", {}), f"{label} {where}: GR2_RUN_DIR"
    for path in [*manifest_paths(), REPO / "ray_cluster.yaml", CLUSTER / "Dockerfile"]:
        assert not SECRET_VALUE.search(path.read_text()), f"{path} contains what looks like a credential"


def test_only_gpu_groups_request_gpus():
    for label, doc in manifests():
        for where, template in pod_templates(doc):
            container = template["spec"]["containers"][0]
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
            if "gpu" in where:
                assert gpus >= 1, f"{label} {where} requests no GPU"
            else:
                assert gpus == 0, f"{label} {where} requests GPUs it has no use for"


# ---------------------------------------------------------------- cluster launcher


@cache
def launcher_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_errors(config: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(launcher_schema())
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message[:200]}" for e in validator.iter_errors(config))


def test_ray_cluster_yaml_validates_with_the_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load_yaml(REPO / "ray_cluster.yaml")
    assert launcher_errors(config) == []
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before touching the cloud


@pytest.mark.parametrize("dotted,value", [
    ("available_node_types.gpu_8.resources.GPU", "eight"),
    ("available_node_types.gpu_8.node_cfg", {"InstanceType": "p4de.24xlarge"}),
    ("docker.imagee", "rayproject/ray:2.60.0-py311-gpu"),
    ("max_workers", -1.5),
])
def test_broken_ray_cluster_yaml_fails(dotted: str, value: Any):
    config = _load_yaml(REPO / "ray_cluster.yaml")
    assert launcher_errors(_set(config, dotted, value)), f"ray_cluster.yaml with {dotted}={value!r} still validates"


def test_ray_cluster_yaml_sizes_and_installs():
    config = _load_yaml(REPO / "ray_cluster.yaml")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_counts = sorted(t["resources"].get("GPU", 0) for t in types.values())
    assert gpu_counts[-1] >= 8, "no node type fits the tensor-parallel teacher and ZeRO-3 trainers (8 GPUs)"
    assert 1 in gpu_counts, "no single-GPU node type for encoders, pre-rank engines and Serve replicas"
    setup = "\n".join(config["setup_commands"])
    assert f"torch=={pinned('torch')}" in setup and "[gpu]" in setup, setup
    assert {".venv", ".cache", "runs"} <= set(config["rsync_exclude"]), "the launcher would upload local caches"
