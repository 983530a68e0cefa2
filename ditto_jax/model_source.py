"""Where a model comes from, as one config entry: a checkpoint path or a random-init preset, plus a tokenizer.

Simulation (supervision model), training (seed model) and evaluation (candidate and judge models) all name
their models with a ``ModelSource``; ``load_model_source`` returns ``(model, cfg, tokenizer)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic

from ditto_jax.config import StrictModel


class ModelSource(StrictModel):
    """A model: ``path`` (Hugging Face folder or model checkpoint) or ``config`` (random init, e.g. ``model/tiny``).

    ``tokenizer`` defaults to the checkpoint's own tokenizer files, else the embedded default tokenizer.
    ``overrides`` are dotted overrides applied to the model config (e.g. ``attention=pallas``, ``dtype=bfloat16``).
    """

    path: str | None = None
    config: str | None = None
    seed: int = 0
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    overrides: list[str] = pydantic.Field(default_factory=list)

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (checkpoint) or `config` (random-init preset)")
        return self

    def describe(self) -> str:
        """One line for logs and reports."""
        return f"checkpoint {self.path}" if self.path else f"random init {self.config} (seed {self.seed})"


def load_model_source(src: ModelSource, mesh: Any = None) -> tuple[Any, Any, Any]:
    """Load ``(model, model_config, tokenizer)`` for a ``ModelSource`` (sharded over ``mesh`` when given)."""
    from ditto_jax.config import apply_overrides, validate
    from ditto_jax.model import ModelConfig, create_model

    if src.path is not None:
        from ditto_jax.model.checkpoint import load_model

        if not Path(src.path).exists():
            raise FileNotFoundError(f"model path does not exist: {src.path}")
        model, cfg = load_model(src.path, mesh=mesh, dtype=src.dtype)
        if src.overrides:
            cfg = validate(ModelConfig, apply_overrides(cfg.model_dump(), src.overrides), f"{src.path} overrides")
            model.cfg = cfg
    else:
        from ditto_jax.config import read_yaml

        data = read_yaml(src.config)
        if src.dtype is not None:
            data["param_dtype"] = data["dtype"] = src.dtype
        cfg = validate(ModelConfig, apply_overrides(data, src.overrides), str(src.config))
        model = create_model(cfg, mesh=mesh, seed=src.seed)
    tokenizer = source_tokenizer(src)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size} ({src.describe()})"
        )
    return model, cfg, tokenizer


def source_tokenizer(src: ModelSource) -> Any:
    """The tokenizer of a ``ModelSource``: ``tokenizer`` if given, else the checkpoint's own files, else the
    embedded default tokenizer."""
    from ditto_jax.tokenizer import default_tokenizer, load_tokenizer

    path = src.tokenizer or (_checkpoint_tokenizer(Path(src.path)) if src.path else None)
    return load_tokenizer(path) if path else default_tokenizer()


def _checkpoint_tokenizer(path: Path) -> str | None:
    for cand in (path / "tokenizer", path):
        if (cand / "tokenizer.json").exists() or (cand / "tokenizer.model").exists():
            return str(cand)
    return None
