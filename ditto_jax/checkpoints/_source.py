"""Where a model comes from, as one config entry: a checkpoint path or a random-init preset, plus a tokenizer.

Simulation (supervision model), training (seed model) and evaluation (candidate and judge models) all name
their models with a ``ModelSource``; ``load_model_source`` returns ``(model, cfg, tokenizer)``.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from ditto_jax.checkpoints._errors import CheckpointError
from ditto_jax.checkpoints._gguf import gguf_tokenizer
from ditto_jax.checkpoints._layout import TOKENIZER_MODEL_FILES
from ditto_jax.checkpoints._resolve import GGUF_FILE, load_model, resolve
from ditto_jax.checkpoints._tokenizer_files import tokenizer_dir
from ditto_jax.config import StrictModel, apply_overrides, read_yaml, validate
from ditto_jax.model import ModelConfig, create_model
from ditto_jax.tokenizer import (
    Tokenizer,
    TokenizerError,
    default_tokenizer,
    load_tokenizer,
)


class ModelSource(StrictModel):
    """A model: ``path`` (Hugging Face folder, GGUF file, model checkpoint, training workdir or step, a named
    model such as ``smollm2-135m-instruct`` fetched once into the cache, or a hub id ``owner/name``) or
    ``config`` (random init, e.g. ``model/tiny``).

    ``tokenizer`` defaults to the checkpoint's own tokenizer (files, or a GGUF file's metadata); a checkpoint
    without one has none (``None``: token-id prompts only). A random-init preset uses the embedded tokenizer.
    ``overrides`` are dotted overrides applied to the model config (e.g. ``attention=pallas``, ``dtype=bfloat16``).
    """

    path: str | None = None
    config: str | None = None
    seed: int = 0
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    overrides: list[str] = pydantic.Field(default_factory=list)

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (checkpoint) or `config` (random-init preset)")
        return self

    def describe(self) -> str:
        """One line for logs and reports."""
        return f"checkpoint {self.path}" if self.path else f"random init {self.config} (seed {self.seed})"


def load_model_source(src: ModelSource, mesh: Any = None,
                      require_tokenizer: bool = False) -> tuple[Any, Any, Tokenizer | None]:
    """Load ``(model, model_config, tokenizer)`` for a ``ModelSource`` (sharded over ``mesh`` when given);
    the tokenizer is None for a checkpoint without one, or with ``require_tokenizer`` (callers that render
    text: simulation, evaluation) an error naming the missing files, raised before any weight is read."""
    tokenizer = source_tokenizer(src, required=require_tokenizer)
    if src.path is not None:
        model, cfg = load_model(src.path, mesh=mesh, dtype=src.dtype)
        if src.overrides:
            cfg = validate(ModelConfig, apply_overrides(cfg.model_dump(), src.overrides), f"{src.path} overrides")
            model.cfg = cfg
    else:
        data = read_yaml(src.config)
        if src.dtype is not None:
            data["param_dtype"] = data["dtype"] = src.dtype
        cfg = validate(ModelConfig, apply_overrides(data, src.overrides), str(src.config))
        model = create_model(cfg, mesh=mesh, seed=src.seed)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                              f"{cfg.vocab_size} ({src.describe()})")
    return model, cfg, tokenizer


def check_model_source(src: ModelSource, require_tokenizer: bool = False) -> None:
    """Fail now, with the error ``load_model_source`` would raise later, if ``src`` cannot be loaded: the path
    resolves to a model (a named model is fetched, a hub id downloaded), a preset exists, and with
    ``require_tokenizer`` a tokenizer is there. Reads no weights; for commands that check every model they
    will use before the first long stage."""
    if src.path is not None:
        resolve(src.path)
    else:
        validate(ModelConfig, apply_overrides(read_yaml(src.config), src.overrides), str(src.config))
    source_tokenizer(src, required=require_tokenizer)


def source_tokenizer(src: ModelSource, required: bool = False) -> Tokenizer | None:
    """The tokenizer of a ``ModelSource``: ``tokenizer`` if given; else the checkpoint's own (tokenizer files,
    or a GGUF file's ``tokenizer.ggml.*`` metadata); else, for a random-init preset, the embedded default.

    A checkpoint without a tokenizer never falls back to the embedded one (its ids would not match the
    model's): the result is None, or with ``required`` a ``CheckpointError`` naming the missing files.
    """
    try:
        if src.tokenizer:
            return load_tokenizer(src.tokenizer)
        if src.path is None:
            return default_tokenizer()
        found = resolve(src.path)
        if found.kind == GGUF_FILE:
            tokenizer = gguf_tokenizer(found.path)
            missing = "tokenizer.ggml.model / tokenizer.ggml.tokens metadata"
        else:
            folder = tokenizer_dir(found.path) or tokenizer_dir(found.weights)
            tokenizer = load_tokenizer(folder) if folder is not None else None
            missing = f"{' or '.join(TOKENIZER_MODEL_FILES)} (in the folder or its tokenizer/)"
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    if tokenizer is None and required:
        raise CheckpointError(f"{src.path}: no tokenizer: the checkpoint has no {missing}; give one with "
                              f"`tokenizer:` (--tokenizer PATH) or use token-id prompts")
    return tokenizer
