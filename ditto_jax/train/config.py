"""The typed SFT config (``configs/sft/*.yaml``), validated completely before anything is compiled."""

from __future__ import annotations

import importlib.resources
import warnings
from pathlib import Path
from typing import Any, Literal

import pydantic

from ditto_jax.checkpoints import ModelSource
from ditto_jax.config import ConfigError, StrictModel, load_config
from ditto_jax.data.pipeline import DataConfig
from ditto_jax.mesh import MeshConfig
from ditto_jax.train.optim import OptimConfig

ASSET_PREFIX = "asset:"
OLD_VALIDATION_KEY = ("`eval:` (validation loss during SFT) is now `validation:`, apart from `ditto-jax eval`'s "
                      "role-play evaluation")


class TrainConfig(StrictModel):
    """Length of the run and how one optimizer step is computed."""

    steps: int = pydantic.Field(gt=0, description="optimizer steps (the schedule spans them)")
    grad_accum: int = pydantic.Field(1, gt=0, description="micro-steps per optimizer step")
    loss_chunk: int | None = pydantic.Field(
        None, gt=0, description="positions per chunk of the fused head + loss; null: chosen for the run, the longest "
        "whose float32 logits stay within 128 MiB a device on CPU, 1 GiB on an accelerator (train.loss.auto_chunk)")
    seed: int = 0


class CheckpointConfig(StrictModel):
    """Checkpoints under ``WORKDIR/checkpoints``; one is also written at the end and on SIGTERM."""

    every: int = pydantic.Field(100, gt=0)
    keep: int = pydantic.Field(3, gt=0)
    async_save: bool = True


class LogConfig(StrictModel):
    """``WORKDIR/metrics.jsonl`` gets a line every step; TensorBoard and the progress bar are optional."""

    tensorboard: bool = True
    progress: bool = True


class ValidationConfig(StrictModel):
    """Validation loss during SFT (the ``validation:`` section; not ``ditto-jax eval``, the role-play evaluation):
    every ``every`` steps (0: never) over ``batches`` batches of ``paths``/``split``; logged as ``eval_loss`` and
    ``eval_accuracy`` in ``metrics.jsonl``."""

    every: int = pydantic.Field(0, ge=0)
    batches: int = pydantic.Field(4, gt=0)
    paths: list[str] | None = pydantic.Field(None, description="None: the training paths")
    split: str = "validation"


class SFTConfig(StrictModel):
    """Everything ``ditto-jax train`` needs; unknown keys and bad values fail with the field's name."""

    model: ModelSource
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig = pydantic.Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = pydantic.Field(default_factory=CheckpointConfig)
    log: LogConfig = pydantic.Field(default_factory=LogConfig)
    validation: ValidationConfig = pydantic.Field(default_factory=ValidationConfig)
    mesh: MeshConfig = pydantic.Field(default_factory=MeshConfig)
    export_hf: bool = pydantic.Field(False, description="write WORKDIR/export/hf at the end")
    platform: Literal["auto", "cpu", "gpu", "tpu"] = "auto"

    @pydantic.model_validator(mode="before")
    @classmethod
    def _old_validation_key(cls, data: Any) -> Any:
        """``eval:`` is the old name of ``validation:``: still read (with a warning), an error next to it."""
        if not isinstance(data, dict) or "eval" not in data:
            return data
        if "validation" in data:
            raise ValueError(f"give `validation:` only: `eval:` is its old name ({OLD_VALIDATION_KEY})")
        warnings.warn(f"SFT config: {OLD_VALIDATION_KEY}; read as `validation:`", FutureWarning, stacklevel=2)
        return {("validation" if k == "eval" else k): v for k, v in data.items()}

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> "SFTConfig":
        batch, accum = self.data.global_batch_size, self.train.grad_accum
        if batch % accum:
            raise ValueError(f"data.global_batch_size ({batch}) must be a multiple of train.grad_accum ({accum})")
        seq, chunk = self.data.seq_len, self.train.loss_chunk
        if chunk is not None and chunk < seq and seq % chunk:
            raise ValueError(f"data.seq_len ({seq}) must be a multiple of train.loss_chunk ({chunk})")
        if not self.data.paths:
            raise ValueError("data.paths is empty: give corpus files, folders or globs "
                             f"(`{ASSET_PREFIX}sample_corpus.jsonl` is the corpus shipped in the package)")
        return self


def resolve_asset_paths(paths: list[str]) -> list[str]:
    """Expand ``asset:NAME`` entries to files shipped in ``ditto_jax/data/assets``."""
    assets = Path(str(importlib.resources.files("ditto_jax"))) / "data" / "assets"
    return [str(assets / p[len(ASSET_PREFIX):]) if p.startswith(ASSET_PREFIX) else p for p in paths]


def load_sft_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SFTConfig:
    """Load and validate an SFT config (a path or a preset such as ``sft/tiny``) with dotted overrides."""
    cfg = load_config(SFTConfig, path, overrides)
    missing = [p for p in resolve_asset_paths(cfg.data.paths) if ASSET_PREFIX in p]
    if missing:
        raise ConfigError(f"data.paths: unresolved asset paths {missing}")
    return cfg
