"""The ``ditto-jax demo`` config (``configs/demo.yaml``, real SmolLM2-135M-Instruct; ``configs/demo-tiny.yaml``,
random init): the three stage configs plus the demo's one model.

Each stage section names a stage preset as its ``base`` (``simulate/smollm2-135m``, ``sft/tiny``, ...) and
overrides some of its keys; the merged section is validated by the stage's own schema, so the demo config is
as strict as the stages. Dotted overrides apply before the merge (``sft.train.steps=10`` overrides the preset).

The demo owns a few keys that tie the stages together, and sets them itself (setting them in the demo config is
an error, so nothing is silently replaced):

* ``simulate.supervision_model`` and ``simulate.seed_model``: the demo's ``model`` (self-alignment, Ditto proper);
* ``sft.model``: the demo's ``model``; ``sft.data.paths``: the simulated corpus, ``WORKDIR/simulate/corpus``;
* ``eval.candidates``: ``seed`` (the demo's ``model``) and ``finetuned`` (the export, ``WORKDIR/export/hf``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Literal

import pydantic

from ditto_jax.checkpoints import ModelSource
from ditto_jax.config import ConfigError, StrictModel, apply_overrides, read_yaml, resolve_config_path, validate
from ditto_jax.eval.config import EvalConfig
from ditto_jax.simulation.config import SimulateConfig
from ditto_jax.train.config import ASSET_PREFIX, SFTConfig

STAGE_SECTIONS = ("simulate", "sft", "eval")
BASE_KEY = "base"
# Keys of each stage section that the demo sets (dotted paths inside the section), and what it sets them to.
OWNED_KEYS: dict[str, dict[str, str]] = {
    "simulate": {"supervision_model": "`model`", "seed_model": "`model`"},
    "sft": {"model": "`model`", "data.paths": "WORKDIR/simulate/corpus (plus corpus.mix_in when it is small)"},
    "eval": {"candidates": "`model` (seed) and WORKDIR/export/hf (finetuned)"},
}
SEED_NAME, FINETUNED_NAME = "seed", "finetuned"


class StageDirs:
    """Where each stage writes inside the demo's ``WORKDIR``."""

    def __init__(self, workdir: str | Path):
        self.root = Path(workdir).absolute()
        self.simulate = self.root / "simulate"
        self.corpus = self.simulate / "corpus"
        self.tfds = self.simulate / "tfds"
        self.train = self.root / "train"
        self.export = self.root / "export"
        self.export_hf = self.export / "hf"
        self.eval = self.root / "eval"
        self.config = self.root / "demo_config.yaml"
        self.summary = self.root / "demo_summary.json"


class CorpusMixConfig(StrictModel):
    """What SFT trains on: the simulated corpus, plus ``mix_in`` only when it has fewer than ``min_sessions``.

    A random-init model writes noise that the filters partly drop; if too little is left, the shipped sample
    corpus is mixed in and the summary says so.
    """

    min_sessions: int = pydantic.Field(4, ge=1)
    mix_in: list[str] = pydantic.Field(default_factory=lambda: [f"{ASSET_PREFIX}sample_corpus.jsonl"])


class ExportConfig(StrictModel):
    """Export to ``WORKDIR/export/hf`` and the check that transformers gives the same logits.

    ``check_transformers``: ``auto`` = when transformers and torch import, ``always`` = fail if they do not,
    ``never`` = skip. ``atol``: the largest absolute logit difference accepted (float32 weights).
    """

    check_transformers: Literal["auto", "always", "never"] = "auto"
    atol: float = pydantic.Field(1e-4, gt=0)
    check_batch: int = pydantic.Field(2, ge=1)
    check_length: int = pydantic.Field(32, ge=1)


class DemoConfig(StrictModel):
    """Everything ``ditto-jax demo`` needs: one model, the three stage configs, corpus mixing, export."""

    model: ModelSource
    simulate: SimulateConfig
    sft: SFTConfig
    eval: EvalConfig
    corpus: CorpusMixConfig = pydantic.Field(default_factory=CorpusMixConfig)
    export: ExportConfig = pydantic.Field(default_factory=ExportConfig)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` merged in: mappings merge key by key, anything else in ``top`` replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _has_key(node: dict[str, Any], dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _set_key(node: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def resolve_sections(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Replace each stage section by its ``base`` preset merged with the section's keys."""
    out = dict(raw)
    for name in STAGE_SECTIONS:
        section = out.get(name)
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: {name}: must be a mapping, got {type(section).__name__}")
        section = dict(section)
        owned = [k for k in OWNED_KEYS[name] if _has_key(section, k)]
        if owned:
            raise ConfigError(f"{source}: " + "; ".join(f"{name}.{k} is set by the demo to {OWNED_KEYS[name][k]}"
                                                         for k in owned) + " -- remove it (the demo's model is `model`)")
        base_name = section.pop(BASE_KEY, None)
        if base_name is not None and not isinstance(base_name, str):
            raise ConfigError(f"{source}: {name}.{BASE_KEY}: must be a preset name or path, got {base_name!r}")
        base = read_yaml(base_name) if base_name else {}
        out[name] = deep_merge(base, section)
    return out


def wire_stages(raw: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    """Set the keys the demo owns: one model for every stage, the stage outputs as the next stage's inputs."""
    dirs = StageDirs(workdir)
    out = copy.deepcopy(raw)
    model = out.get("model")
    _set_key(out["simulate"], "supervision_model", copy.deepcopy(model))
    _set_key(out["simulate"], "seed_model", copy.deepcopy(model))
    _set_key(out["sft"], "model", copy.deepcopy(model))
    _set_key(out["sft"], "data.paths", [str(dirs.corpus)])
    out["eval"]["candidates"] = [{"name": SEED_NAME, "model": copy.deepcopy(model)},
                                 {"name": FINETUNED_NAME, "model": {"path": str(dirs.export_hf)}}]
    return out


def load_demo_config(path: str | Path, overrides: Iterable[str] = (), workdir: str | Path = ".",
                     model: dict[str, Any] | None = None) -> DemoConfig:
    """Load ``configs/demo.yaml`` (or another file), apply dotted overrides, merge the stage presets, wire the
    stages to ``workdir``, validate everything (before any model is built).

    ``model`` (``ditto-jax demo --model SRC``) replaces the demo's model and the judge's (self-alignment: one
    model does everything); dotted overrides still apply on top (``eval.judge.model.path=...``)."""
    source = str(resolve_config_path(path))
    raw = read_yaml(path)
    if model is not None:
        raw["model"] = dict(model)
        eval_section = raw.get("eval") if isinstance(raw.get("eval"), dict) else {}
        raw["eval"] = {**eval_section, "judge": {**(eval_section.get("judge") or {}), "model": dict(model)}}
    raw = apply_overrides(raw, overrides)
    if "model" not in raw:
        raise ConfigError(f"{source}: model: required (the demo's model, e.g. {{path: smollm2-135m-instruct}})")
    return validate(DemoConfig, wire_stages(resolve_sections(raw, source), workdir), source)
