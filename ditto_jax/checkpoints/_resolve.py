"""What is at a path: a Hugging Face folder, a GGUF file, a model checkpoint, a training step or workdir.

``resolve`` answers without reading any weights; ``load_model`` loads whatever it found.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jax.sharding import Mesh

from ditto_jax.checkpoints._errors import CheckpointError
from ditto_jax.checkpoints._fetch import locate
from ditto_jax.checkpoints._gguf import load_gguf
from ditto_jax.checkpoints._layout import (
    CHECKPOINT_DIR,
    GGUF_SUFFIX,
    HF_CONFIG_FILE,
    MODEL_CONFIG_FILE,
    PARAMS_DIR,
    TRAIN_META,
)
from ditto_jax.checkpoints._model_checkpoint import load_model_checkpoint, restore_model
from ditto_jax.hf import load_pretrained
from ditto_jax.model.config import ModelConfig
from ditto_jax.model.transformer import Transformer

HF_FOLDER = "Hugging Face folder"
GGUF_FILE = "GGUF file"
MODEL_CHECKPOINT = "model checkpoint"
TRAINING_STEP = "training checkpoint step"


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A recognised model at ``path``: its ``kind`` and the file or folder the weights are read from
    (``weights`` is the newest step folder for a training workdir, else ``path``)."""

    kind: str
    path: Path
    weights: Path


def is_model_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a model checkpoint folder (``model.yaml`` + ``params/``)."""
    path = Path(path)
    return (path / MODEL_CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def training_step_dir(path: str | Path) -> Path | None:
    """A training checkpoint step folder (``params/`` + ``meta/metadata``), or the newest one under
    ``WORKDIR/checkpoints/`` of a training workdir; None if ``path`` is neither."""
    path = Path(path)
    if (path / TRAIN_META).is_file() and (path / PARAMS_DIR).is_dir():
        return path
    root = path / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / TRAIN_META).is_file()]
    return root / str(max(steps)) if steps else None


def resolve(path: str | Path) -> Resolved:
    """What is at ``path`` (a local file or folder, a named model or a hub id, see ``locate``); a
    ``CheckpointError`` naming it if nothing we can load."""
    path = locate(path)
    if path.is_file():
        if path.suffix.lower() == GGUF_SUFFIX or _has_gguf_magic(path):
            return Resolved(GGUF_FILE, path, path)
        raise CheckpointError(f"{path}: not a model: a file must be a GGUF file (.gguf); folders may be a Hugging "
                              f"Face folder, a model checkpoint or a training workdir")
    if is_model_checkpoint(path):
        return Resolved(MODEL_CHECKPOINT, path, path)
    if (path / HF_CONFIG_FILE).is_file():
        return Resolved(HF_FOLDER, path, path)
    step_dir = training_step_dir(path)
    if step_dir is not None:
        return Resolved(TRAINING_STEP, path, step_dir)
    raise CheckpointError(
        f"{path}: not a model: expected a Hugging Face folder ({HF_CONFIG_FILE} + safetensors), a GGUF file, "
        f"a model checkpoint ({MODEL_CONFIG_FILE} + {PARAMS_DIR}/) or a training workdir / checkpoint step"
    )


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_model(path: str | Path, mesh: Mesh | None = None, dtype: str | None = None,
               rules: dict | None = None) -> tuple[Transformer, ModelConfig]:
    """``(model, cfg)`` from whatever ``resolve(path)`` finds, every parameter placed in its sharding."""
    found = resolve(path)
    if found.kind == MODEL_CHECKPOINT:
        return load_model_checkpoint(found.weights, mesh=mesh, dtype=dtype, rules=rules)
    if found.kind == HF_FOLDER:
        return load_pretrained(found.weights, mesh=mesh, dtype=dtype, rules=rules)
    if found.kind == GGUF_FILE:
        return load_gguf(found.weights, mesh=mesh, dtype=dtype, rules=rules)
    meta_file = found.weights / TRAIN_META
    try:
        cfg = ModelConfig.model_validate(json.loads(meta_file.read_text())["model_config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_file}: unreadable training metadata (need 'model_config'): {exc}") from None
    return restore_model(cfg, found.weights / PARAMS_DIR, mesh, dtype, rules)
