"""Config loading: overrides, errors naming the field, and every shipped YAML loads with its stage's class."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from rec.config import ConfigError, StageConfig, load_config

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
SHIPPED = sorted(CONFIG_ROOT.glob("*/*.yaml"))


def config_class(stage: str) -> type[StageConfig]:
    module = importlib.import_module(f"pipelines.{stage}")
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, StageConfig) and v is not StageConfig
               and v.__module__ == module.__name__]
    assert len(classes) == 1, f"pipelines.{stage} should define exactly one StageConfig, found {classes}"
    return classes[0]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    cfg = load_config(config_class(path.stem), path)
    assert cfg.run_dir


def stage_modules() -> set[str]:
    """pipelines/<stage>.py files whose docstring opens with "Stage `<stage>`" (helpers such as common, check or a
    stage's split-out parts are not stages)."""
    return {p.stem for p in CONFIG_ROOT.parent.glob("*.py") if p.read_text().startswith(f'"""Stage `{p.stem}`')}


def test_tiny_preset_covers_every_stage_module():
    stages = stage_modules()
    assert {"prepare", "sid", "midtrain", "prerank", "traces", "sft", "rl", "evaluate"} <= stages
    tiny = {p.stem for p in (CONFIG_ROOT / "tiny").glob("*.yaml")}
    assert stages <= tiny, f"stages without a tiny config: {sorted(stages - tiny)}"


def test_overrides_reach_nested_fields_and_parse_types(tmp_path):
    from pipelines.sid import SidConfig

    cfg = load_config(SidConfig, CONFIG_ROOT / "tiny" / "sid.yaml",
                      ["run_dir=/tmp/x", "embed.actors=2", "quantizer=rq_vae", "rq_vae.ema=false"])
    assert (cfg.run_dir, cfg.embed.actors, cfg.quantizer, cfg.rq_vae.ema) == ("/tmp/x", 2, "rq_vae", False)


@pytest.mark.parametrize(
    "override, field",
    [("levels=0", "levels"), ("embed.actorz=2", "embed.actorz"), ("quantizer=pq", "quantizer"),
     ("codebook_size=many", "codebook_size")],
)
def test_bad_values_name_the_file_and_field(override, field):
    from pipelines.sid import SidConfig

    path = CONFIG_ROOT / "tiny" / "sid.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(SidConfig, path, [override])
    assert str(path) in str(err.value) and field in str(err.value)


def test_malformed_override_and_missing_file():
    from pipelines.prepare import PrepareConfig

    with pytest.raises(ConfigError, match="key=value"):
        load_config(PrepareConfig, None, ["run_dir"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PrepareConfig, "nope.yaml")


def test_local_ray_keeps_a_cpu_for_ray_data_tasks():
    from pipelines.common import local_cpus

    assert local_cpus(None, 2.0, "2 actors") == 3
    assert local_cpus(8, 2.0, "2 actors") == 8
    with pytest.raises(ConfigError, match="num_cpus=2 leaves no CPU for Ray Data's own tasks"):
        local_cpus(2, 2.0, "the encoder actors")


def test_a_field_added_later_at_its_neutral_value_matches_runs_recorded_with_or_without_it(tmp_path):
    """`model.dropout` came after run directories were recorded: at 0.0 it is left out of the fingerprint, and a
    stored fingerprint that has it at 0.0 (recorded between) or lacks it (recorded before) is the same config."""
    from pipelines.midtrain import MidtrainConfig
    from pipelines.train_utils import check_previous
    from rec.config import config_fingerprint, same_fingerprint
    from rec.io import RunDir

    yaml_file = CONFIG_ROOT / "tiny_full" / "midtrain.yaml"
    plain = config_fingerprint(load_config(MidtrainConfig, yaml_file))
    dropped = config_fingerprint(load_config(MidtrainConfig, yaml_file, ["model.dropout=0.2"]))
    assert "dropout" not in plain["model"] and dropped["model"]["dropout"] == 0.2
    between = {**plain, "model": {**plain["model"], "dropout": 0.0}}
    assert same_fingerprint(MidtrainConfig, between, plain) and same_fingerprint(MidtrainConfig, plain, plain)
    assert not same_fingerprint(MidtrainConfig, dropped, plain) and not same_fingerprint(MidtrainConfig, None, plain)
    assert not same_fingerprint(MidtrainConfig, {**plain, "model": {**plain["model"], "num_layers": 3}}, plain)
    run_dir = RunDir.open(str(tmp_path / "run"))
    run_dir.write_json(between, "models", "ckpt", "fingerprint.json")
    check_previous("midtrain", run_dir, "ckpt", ("models", "out"), plain, False, MidtrainConfig)  # resumes
    run_dir.write_json(dropped, "models", "ckpt", "fingerprint.json")
    with pytest.raises(RuntimeError, match="fields differ: model"):
        check_previous("midtrain", run_dir, "ckpt", ("models", "out"), plain, False, MidtrainConfig)
