"""Export a model as a Hugging Face folder: config.json, generation_config.json, sharded safetensors + index.

The mapping table of ``ditto_jax.hf.mapping`` read backwards: each stacked parameter is sliced layer by layer
on device (one jitted slice for all parameters of a layer), gathered to the host and written shard by shard
(host memory peaks at about one shard). The folder appears atomically: written to a temporary sibling, then
renamed. In a multi-process run every process takes part in the gathers and process 0 writes.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from ditto_jax.fileio import atomic_directory, atomic_write_json
from ditto_jax.hf.config import HFCheckpointError, generation_config, to_hf_config
from ditto_jax.hf.load import INDEX_FILE, SINGLE_FILE
from ditto_jax.hf.mapping import TensorRule, hf_names, rules_for
from ditto_jax.model.config import ModelConfig

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"invalid size {size!r}; use bytes or e.g. '5GB', '500MB', '2GiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.lru_cache(maxsize=16)
def _take_layer(keys: tuple[str, ...]) -> Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]]:
    return jax.jit(lambda params, i: {k: params[k][i] for k in keys})


class _Plan:
    """Tensors in HF order (embeddings, layer 0..L-1, final norm, head) split into shards by size."""

    def __init__(self, cfg: ModelConfig, params: dict[str, jax.Array], dtype: np.dtype, max_shard: int):
        rules = rules_for(cfg)
        self.entries: list[tuple[str, TensorRule, int | None]] = []
        head = [r for r in rules if not r.stacked and r.ours == "embed_tokens"]
        tail = [r for r in rules if not r.stacked and r.ours != "embed_tokens"]
        for r in head:
            self.entries.append((r.hf, r, None))
        for i in range(cfg.num_layers):
            for r in (r for r in rules if r.stacked):
                self.entries.append((hf_names(r, cfg)[i], r, i))
        for r in tail:
            self.entries.append((r.hf, r, None))
        self.shard_of: dict[str, int] = {}
        shard, used = 0, 0
        for name, rule, layer in self.entries:
            shape = params[rule.ours].shape[1:] if rule.stacked else params[rule.ours].shape
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if used and used + nbytes > max_shard:
                shard, used = shard + 1, 0
            self.shard_of[name] = shard
            used += nbytes
        self.num_shards = shard + 1

    def file_name(self, shard: int) -> str:
        """``model.safetensors`` for one shard, else ``model-0000i-of-0000N.safetensors``."""
        if self.num_shards == 1:
            return SINGLE_FILE
        return f"model-{shard + 1:05d}-of-{self.num_shards:05d}.safetensors"


def _check_params(cfg: ModelConfig, params: dict[str, jax.Array]) -> None:
    wanted = {r.ours for r in rules_for(cfg)}
    if set(params) != wanted:
        raise HFCheckpointError(
            f"model parameters {sorted(set(params) ^ wanted)} do not match the {cfg.architecture} table "
            f"(tie_word_embeddings={cfg.tie_word_embeddings})"
        )


def _safe_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "config.json").exists())):
        raise HFCheckpointError(f"{out_dir}: exists and is not a Hugging Face export; refusing to replace it")


def save_pretrained(model: nnx.Module, cfg: ModelConfig | None, out_dir: str | Path, tokenizer: Any = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder that ``transformers.AutoModelForCausalLM`` loads.

    Args:
      model: a ``Transformer`` (any sharding).
      cfg: its config (default ``model.cfg``).
      out_dir: the folder; an existing HF export there is replaced atomically, anything else is refused.
      tokenizer: an object with ``save(dir)`` (``ditto_jax.tokenizer.Tokenizer``); its files go in the folder.
      max_shard_size: bytes or a string like ``"5GB"``; more than one shard adds ``model.safetensors.index.json``.
      dtype: tensor dtype in the files (default: the parameters' dtype).
    """
    cfg = cfg or model.cfg
    out_dir = Path(out_dir)
    params = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    _check_params(cfg, params)
    out_dtype = np.dtype(jax.numpy.dtype(dtype or params["embed_tokens"].dtype))
    plan = _Plan(cfg, params, out_dtype, parse_size(max_shard_size))
    hf_cfg = to_hf_config(cfg)
    hf_cfg["torch_dtype"] = out_dtype.name
    writer = jax.process_index() == 0
    if writer:
        _safe_target(out_dir)
    stacked_keys = tuple(sorted({r.ours for _, r, layer in plan.entries if layer is not None}))
    take = _take_layer(stacked_keys)
    stacked = {k: params[k] for k in stacked_keys}

    def tensors():
        layer_cache: tuple[int, dict[str, jax.Array]] | None = None
        for name, rule, layer in plan.entries:
            if layer is None:
                value = _to_host(params[rule.ours])
            else:
                if layer_cache is None or layer_cache[0] != layer:
                    layer_cache = (layer, take(stacked, np.int32(layer)))
                value = _to_host(layer_cache[1][rule.ours])
            value = value.T if rule.transpose else value
            yield name, np.ascontiguousarray(value).astype(out_dtype, copy=False)

    def write(folder: Path | None) -> None:
        shard: dict[str, np.ndarray] = {}
        current = 0
        for name, value in tensors():
            if plan.shard_of[name] != current:
                if folder is not None:
                    save_file(shard, str(folder / plan.file_name(current)), metadata={"format": "pt"})
                shard, current = {}, plan.shard_of[name]
            shard[name] = value
        if folder is not None:
            save_file(shard, str(folder / plan.file_name(current)), metadata={"format": "pt"})
            if plan.num_shards > 1:
                total = sum(int(np.prod(params[r.ours].shape)) for r in rules_for(cfg)) * out_dtype.itemsize
                atomic_write_json(folder / INDEX_FILE, {
                    "metadata": {"total_size": total},
                    "weight_map": {n: plan.file_name(s) for n, s in plan.shard_of.items()},
                })
            atomic_write_json(folder / "config.json", hf_cfg)
            atomic_write_json(folder / "generation_config.json", generation_config(cfg))
            if tokenizer is not None:
                tokenizer.save(folder)

    if not writer:
        write(None)
        return out_dir
    with atomic_directory(out_dir, overwrite=True) as tmp:
        write(tmp)
    return out_dir
