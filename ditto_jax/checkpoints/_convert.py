"""Conversions between the formats of the store (what ``ditto-jax convert`` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ditto_jax.checkpoints._errors import CheckpointError
from ditto_jax.checkpoints._gguf import gguf_tokenizer
from ditto_jax.checkpoints._model_checkpoint import save_model_checkpoint
from ditto_jax.checkpoints._resolve import GGUF_FILE, load_model, resolve
from ditto_jax.checkpoints._tokenizer_files import folder_tokenizer
from ditto_jax.hf import save_pretrained
from ditto_jax.model.config import ModelConfig


def tokenizer_to_copy(path: str | Path) -> Any:
    """What to write as the tokenizer of a conversion from ``path``: its tokenizer files verbatim (folders), the
    tokenizer built from a GGUF file's metadata, or None when the source has no tokenizer."""
    found = resolve(path)
    if found.kind == GGUF_FILE:
        return gguf_tokenizer(found.path)
    return folder_tokenizer(found.path) or folder_tokenizer(found.weights)


def convert_to_checkpoint(src: str | Path, dst: str | Path, kind: str | None = None, dtype: str | None = None,
                          overwrite: bool = False) -> ModelConfig:
    """Write the model at ``src`` (of ``kind`` if given, e.g. ``GGUF_FILE``) as a model checkpoint folder
    ``dst`` (atomically); returns its config."""
    found = resolve(src)
    if kind is not None and found.kind != kind:
        raise CheckpointError(f"{src}: expected a {kind}, found a {found.kind}")
    if Path(dst).exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists (pass --overwrite to replace it)")
    tokenizer = tokenizer_to_copy(src)
    model, cfg = load_model(src, dtype=dtype)
    save_model_checkpoint(model, cfg, dst, tokenizer=tokenizer, overwrite=overwrite)
    return cfg


def convert_to_hf(src: str | Path, dst: str | Path, dtype: str | None = None, max_shard_size: str = "5GB",
                  overwrite: bool = False) -> ModelConfig:
    """Write the model at ``src`` (any kind) as a Hugging Face folder ``dst``; returns its config."""
    if Path(dst).exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists (pass --overwrite to replace it)")
    tokenizer = tokenizer_to_copy(src)
    model, cfg = load_model(src, dtype=dtype)
    save_pretrained(model, cfg, dst, tokenizer=tokenizer, max_shard_size=max_shard_size)
    return cfg
