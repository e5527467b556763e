"""Typed stage configs loaded from YAML with `key=value` overrides.

Every stage defines a pydantic model that subclasses `StageConfig`; `load_config(Cls, path, overrides)` reads the
YAML file, applies overrides (dotted keys reach nested sections, values are parsed as YAML scalars), and checks
every field and invariant at load time, so a typo or a bad value fails before any work starts, naming the file
and the field.

>>> class Demo(StageConfig):
...     seed: int = 0
>>> apply_overrides({"run_dir": "runs/x", "seed": 1}, ["seed=7"])
{'run_dir': 'runs/x', 'seed': 7}
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the field."""


class Section(BaseModel):
    """A nested config section: unknown keys are errors, field docstrings document the YAML.

    `ADDED_LATER` names fields added after run directories were recorded, with the value that behaves as before the
    field existed: `config_fingerprint` leaves such a field out while it holds that value, so an older run's outputs
    still match (and a different value is a real change)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
    ADDED_LATER: ClassVar[dict[str, Any]] = {}


class StageConfig(Section):
    """Fields every stage shares."""

    run_dir: str = Field(min_length=1)
    """Run directory that connects the stages: a local path or a pyarrow.fs URI (s3://, gs://, file://)."""
    seed: int = 0
    """Seed for every random choice of the stage (slices, initialisation, sampling)."""


C = TypeVar("C", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (["a", "b"], parsed value); the value is read as a YAML scalar.

    >>> parse_override("sid.levels=3")
    (['sid', 'levels'], 3)
    >>> parse_override("run_dir=runs/tiny")
    (['run_dir'], 'runs/tiny')
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key=value` override applied (dotted keys create nested dicts)."""
    merged = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = merged
        for part in keys[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[keys[-1]] = value
    return merged


def _format_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<top>"
        lines.append(f"  {where}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Load `cls` from a YAML file (or from overrides alone when `path` is None) and validate it."""
    data: dict[str, Any] = {}
    source = "<overrides>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of field: value")
        data = loaded
    return validate_config(cls, data, overrides or [], source)


def validate_config(cls: type[C], data: dict[str, Any], overrides: list[str], source: str | None = None) -> C:
    """`cls` from an already-read mapping plus `key=value` overrides; errors name `source` and the field."""
    data = apply_overrides(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source or '<overrides>'}: invalid {cls.__name__}:\n{_format_errors(err)}") from None


def config_fingerprint(config: BaseModel, exclude: set[str] | None = None) -> dict[str, Any]:
    """The fields that determine a stage's output, for detecting a run_dir written by another config; a field of
    a section's `ADDED_LATER` is left out while it holds its neutral value (tests/test_config.py)."""
    return without_neutral(type(config), config.model_dump(mode="json", exclude=exclude or set()))


def without_neutral(cls: type[BaseModel], data: Any) -> Any:
    """`data` (a fingerprint of a `cls` config, or one recorded by an older version) without the `ADDED_LATER`
    fields that hold their neutral value, at any depth of nested sections: compare stored fingerprints through it
    (`same_fingerprint`), so runs recorded before or after a field was added both match a config that leaves it
    neutral."""
    if cls is None or not isinstance(data, dict):
        return data
    added_later = getattr(cls, "ADDED_LATER", {})
    out = {}
    for name, value in data.items():
        if name in added_later and value == added_later[name]:
            continue
        field = cls.model_fields.get(name)
        inner = field.annotation if field is not None else None
        out[name] = without_neutral(inner, value) if isinstance(inner, type) and issubclass(inner, BaseModel) \
            else value
    return out


def same_fingerprint(cls: type[BaseModel] | None, previous: dict | None, current: dict) -> bool:
    """Whether a stored fingerprint and this config's are the same config (neutral `ADDED_LATER` fields aside;
    `cls` None: plain equality)."""
    return previous is not None and without_neutral(cls, previous) == without_neutral(cls, current)
