"""Model checkpoint folders (``model.yaml`` + Orbax ``params/`` + optional ``tokenizer/``): save and restore,
every parameter written and restored directly in its sharding."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from ditto_jax.checkpoints._errors import CheckpointError
from ditto_jax.checkpoints._layout import MODEL_CONFIG_FILE, PARAMS_DIR, TOKENIZER_DIR
from ditto_jax.config import dump_config, load_config
from ditto_jax.fileio import atomic_write_text
from ditto_jax.mesh import param_shardings
from ditto_jax.model.config import ModelConfig
from ditto_jax.model.transformer import Transformer


def is_model_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a model checkpoint folder (``model.yaml`` + ``params/``)."""
    path = Path(path)
    return (path / MODEL_CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_model_checkpoint(model: nnx.Module, cfg: ModelConfig | None, path: str | Path, tokenizer: Any = None,
                          overwrite: bool = False) -> Path:
    """Write ``model`` as a model checkpoint folder, atomically (a partial sibling renamed when complete).

    Every process of a multi-process run must call it (Orbax writes each process's shards); process 0 writes
    the config and tokenizer and renames.
    """
    cfg = cfg or model.cfg
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True, or --overwrite, to replace it)")
    if path.exists() and not is_model_checkpoint(path):
        raise FileExistsError(f"{path} exists and is not a model checkpoint; refusing to replace it")
    # A deterministic temporary name: every process must pass Orbax the same path.
    partial = path.parent / f".{path.name}.partial"
    writer = jax.process_index() == 0
    if writer:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    multihost_utils.sync_global_devices(f"ckpt-begin:{path}")
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((partial / PARAMS_DIR).absolute(), nnx.state(model, nnx.Param).to_pure_dict())
        checkpointer.wait_until_finished()
        if writer:
            atomic_write_text(partial / MODEL_CONFIG_FILE, dump_config(cfg))
            if tokenizer is not None:
                tokenizer.save(partial / TOKENIZER_DIR)
    except BaseException:
        if writer:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if writer:
        old = path.parent / f".{path.name}.old"
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        partial.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    multihost_utils.sync_global_devices(f"ckpt-end:{path}")
    return path


def load_model_checkpoint(path: str | Path, mesh: Mesh | None = None, dtype: str | None = None,
                          rules: dict | None = None) -> tuple[Transformer, ModelConfig]:
    """Restore a model checkpoint folder, every parameter directly in its sharding (``dtype`` casts)."""
    path = Path(path)
    return restore_model(load_config(ModelConfig, path / MODEL_CONFIG_FILE), path / PARAMS_DIR, mesh, dtype, rules)


def restore_model(cfg: ModelConfig, params_dir: str | Path, mesh: Mesh | None = None, dtype: str | None = None,
                  rules: dict | None = None) -> tuple[Transformer, ModelConfig]:
    """A ``Transformer`` of ``cfg`` with the Orbax parameter tree in ``params_dir`` (a model checkpoint's
    ``params/``, or a training checkpoint's ``params`` item), every parameter restored in its sharding."""
    params_dir = Path(params_dir)
    if dtype is not None:
        name = jnp.dtype(dtype).name
        cfg = cfg.model_copy(update={"param_dtype": name, "dtype": name})
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    if mesh is not None:
        shardings = param_shardings(abs_state, mesh, rules)
    else:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abs_state)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abs_state.to_pure_dict(), shardings.to_pure_dict(),
    )
    try:
        restored = ocp.StandardCheckpointer().restore(params_dir.absolute(), target)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise CheckpointError(f"{params_dir}: cannot restore parameters for the model config "
                         f"({cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}): {exc}") from exc
    nnx.replace_by_pure_dict(abs_state, restored)
    return nnx.merge(graphdef, abs_state), cfg
