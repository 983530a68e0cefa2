"""Typed YAML configs with dotted command-line overrides.

Every config is a pydantic model (``StrictModel`` forbids unknown keys, so a typo is an error that names the
field). ``load_config`` reads YAML, applies ``a.b.c=value`` overrides (values parsed as YAML scalars), and
validates *before* anything is compiled or written.
"""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path
from typing import Any, Iterable, TypeVar

import pydantic
import yaml

from ditto_jax.fileio import atomic_write_text

T = TypeVar("T", bound=pydantic.BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the field."""


class StrictModel(pydantic.BaseModel):
    """Base for all configs: unknown keys are errors, values are validated on assignment."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def packaged_configs_dir() -> Path:
    """The folder of YAML presets shipped inside the package (``configs/`` in the repository)."""
    return Path(str(importlib.resources.files("ditto_jax.configs")))


def resolve_config_path(name: str | Path) -> Path:
    """Find a config: an existing path, else a path relative to the packaged ``configs/`` folder.

    ``"model/tiny"``, ``"model/tiny.yaml"`` and ``"configs/model/tiny.yaml"`` all resolve to the preset.
    """
    path = Path(name)
    if path.exists():
        return path
    rel = Path(*path.parts[1:]) if path.parts and path.parts[0] == "configs" else path
    # Append (not replace) the suffix: a preset name may contain dots ("qwen2.5-0.5b").
    for cand in (packaged_configs_dir() / rel, packaged_configs_dir() / rel.parent / f"{rel.name}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"config not found: {name} (neither a file nor a preset under {packaged_configs_dir()})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a nested dict (value parsed as YAML); returns a new dict."""

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def validate(schema: type[T], data: dict[str, Any], source: str = "<config>") -> T:
    """Validate a mapping against a schema; errors list every bad field as ``source: a.b.c: message``."""
    try:
        return schema.model_validate(data)
    except pydantic.ValidationError as exc:
        lines = [f"{source}: {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(schema: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Load ``path`` (or an empty mapping), apply overrides, validate against ``schema``."""
    data = read_yaml(path) if path is not None else {}
    source = str(resolve_config_path(path)) if path is not None else "<defaults>"
    return validate(schema, apply_overrides(data, overrides), source)


def dump_config(cfg: pydantic.BaseModel) -> str:
    """Serialise a config back to YAML (stored next to checkpoints and reports)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def pin_config(workdir: Path, name: str, cfg: pydantic.BaseModel, what: str) -> None:
    """Keep ``cfg`` as ``workdir/name`` on the first run; a re-run (resume) must bring the same config.

    The pinned file is compared as a config, not as text: one written before a field with a default was added
    to the schema still resumes when it validates to ``cfg``. ``what`` names the run in the error (e.g. "an
    evaluation").
    """
    path = workdir / name
    text = dump_config(cfg)
    if not path.exists():
        atomic_write_text(path, text)
    elif (old := path.read_text(encoding="utf-8")) != text and not _same_config(old, cfg):
        raise ConfigError(f"{workdir} holds {what} with a different config ({path}); resume with the same config "
                          f"and overrides, or use a new --workdir")


def _same_config(text: str, cfg: pydantic.BaseModel) -> bool:
    """Whether YAML ``text`` validates to a config equal to ``cfg``."""
    old = reread_config(type(cfg), text)
    return old is not None and old == cfg


def reread_config(schema: type[T], text: str) -> T | None:
    """A config written earlier (YAML ``text``) as ``schema`` reads it today: fields added since then take their
    defaults; ``None`` when it no longer parses or validates."""
    try:
        return schema.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, pydantic.ValidationError):
        return None
