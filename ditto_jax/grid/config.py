"""The ``ditto-jax grid`` config schema (``configs/grid/*.yaml``).

``models`` names every model once; ``seeds`` are fine-tuned, ``supervisors`` simulate corpora (the paper: Qwen-Chat
1.8B/7B/14B/72B on both axes). The stage sections ``simulate``, ``sft`` and ``eval`` start from a stage preset
(``base``, as in ``configs/demo.yaml``) and override keys; the grid sets the keys that tie the stages together
(setting them in the config is an error, so nothing is silently replaced):

* ``simulate.supervision_model`` / ``seed_model``: the supervisor (a corpus does not depend on the seed);
* ``sft.model``: the seed; ``sft.data.paths``: the supervisor's corpus (plus ``corpus.mix_in`` when it has fewer
  than ``corpus.min_sessions`` sessions, as the demo does; counted in ``grid.json``);
* ``eval.candidates``: ``<seed>__none`` (the seed as it is: the no-role-play baseline, when ``baseline``) and
  ``<seed>__<supervisor>`` (its fine-tune, the training workdir's last step).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import pydantic

from ditto_jax.checkpoints import ModelSource
from ditto_jax.config import ConfigError, StrictModel, apply_overrides, read_yaml, resolve_config_path, validate
from ditto_jax.demo.config import CorpusMixConfig, deep_merge
from ditto_jax.eval.config import EvalConfig
from ditto_jax.simulation.config import SimulateConfig
from ditto_jax.train.config import SFTConfig

SECTIONS = ("simulate", "sft", "eval")
OWNED = {"simulate": ("supervision_model", "seed_model"), "sft": ("model", "data.paths"), "eval": ("candidates",)}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
NONE = "none"  # the no-role-play column


class GridConfig(StrictModel):
    """Everything ``ditto-jax grid`` needs (see the module docstring). ``simulate``/``sft``/``eval`` are the
    resolved stage configs without the grid-owned keys; ``run_grid`` fills those in per cell."""

    models: dict[str, ModelSource] = pydantic.Field(min_length=1)
    seeds: list[str] = pydantic.Field(min_length=1)
    supervisors: list[str] = pydantic.Field(min_length=1)
    baseline: bool = True
    corpus: CorpusMixConfig = pydantic.Field(default_factory=CorpusMixConfig)
    simulate: dict[str, Any]
    sft: dict[str, Any]
    eval: dict[str, Any]

    @pydantic.model_validator(mode="after")
    def _names(self) -> "GridConfig":
        for name in self.models:
            if not re.match(NAME_PATTERN, name) or "__" in name or name == NONE:
                raise ValueError(f"models.{name}: a model name is letters, digits, '.', '_' or '-' (no '__', not "
                                 f"{NONE!r})")
        for key in ("seeds", "supervisors"):
            values = getattr(self, key)
            unknown = [n for n in values if n not in self.models]
            if unknown:
                raise ValueError(f"{key}: {unknown} not in models ({sorted(self.models)})")
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: repeated names {values}")
        return self

    def simulate_config(self, supervisor: str) -> SimulateConfig:
        """The simulation of one supervisor's corpus."""
        model = self.models[supervisor].model_dump(mode="json")
        return validate(SimulateConfig, {**self.simulate, "supervision_model": model, "seed_model": model},
                        f"grid simulate ({supervisor})")

    def sft_config(self, seed: str, paths: list[str]) -> SFTConfig:
        """The fine-tune of one seed on ``paths``."""
        data = deep_merge(self.sft, {"model": self.models[seed].model_dump(mode="json"), "data": {"paths": paths}})
        return validate(SFTConfig, data, f"grid sft ({seed})")

    def eval_config(self, candidates: list[dict[str, Any]]) -> EvalConfig:
        """The one evaluation of every cell, one judge."""
        return validate(EvalConfig, {**self.eval, "candidates": candidates}, "grid eval")


def cell_name(seed: str, supervisor: str) -> str:
    """The evaluation candidate of a cell (``<seed>__<supervisor>``, ``<seed>__none`` for the baseline)."""
    return f"{seed}__{supervisor}"


def _has_key(node: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_grid_config(path: str | Path, overrides: Iterable[str] = ()) -> GridConfig:
    """Load a grid config, apply dotted overrides, merge the stage presets, check the grid-owned keys are unset,
    and validate every stage config once with placeholder models (before anything runs)."""
    source = str(resolve_config_path(path))
    raw = apply_overrides(read_yaml(path), overrides)
    for name in SECTIONS:
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: {name}: must be a mapping, got {type(section).__name__}")
        section = copy.deepcopy(section)
        base = section.pop("base", None)
        merged = deep_merge(read_yaml(base) if base else {}, section)
        for key in OWNED[name]:
            if _has_key(merged, key) and _has_key(section, key):
                raise ConfigError(f"{source}: {name}.{key} is set by the grid per cell -- remove it")
            parent, _, leaf = key.rpartition(".")
            node = merged
            for part in parent.split(".") if parent else []:
                node = node.get(part, {})
            if isinstance(node, dict):
                node.pop(leaf, None)
        raw[name] = merged
    cfg = validate(GridConfig, raw, source)
    cfg.simulate_config(cfg.supervisors[0])  # every stage schema checked now, not after hours of simulation
    cfg.sft_config(cfg.seeds[0], ["corpus"])
    cfg.eval_config([{"name": "check", "model": cfg.models[cfg.seeds[0]].model_dump(mode="json")}])
    return cfg
