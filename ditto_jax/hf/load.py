"""Import a Hugging Face causal-LM folder, streamed tensor by tensor straight into the target sharding.

Every tensor is checked (names, shapes) against the family's table before any data is read. Then each of our
parameters is built on device: a per-layer tensor is read as the slices its devices need
(``jax.make_array_from_callback`` over safetensors' lazy slices) and written into a preallocated, already
sharded stacked buffer by a donated in-place update, one layer at a time: host memory holds at most one
layer's tensors (on an accelerator each is freed as soon as it is copied), never the model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from safetensors import SafetensorError, safe_open

from ditto_jax.hf.config import HFCheckpointError, from_hf_config
from ditto_jax.hf.mapping import IGNORED, TensorRule, expected_tensors, hf_shape
from ditto_jax.mesh import param_shardings
from ditto_jax.model.config import ModelConfig
from ditto_jax.model.transformer import Transformer

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
SINGLE_FILE = "model.safetensors"


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF folder (clear errors for a missing path, file or bad JSON)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HFCheckpointError(f"{path}: not a Hugging Face model folder (no config.json)")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HFCheckpointError(f"{config_file}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{config_file}: top level must be an object")
    return data


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index file or the single ``model.safetensors``."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HFCheckpointError(f"{index}: invalid index file ({exc!r}; expected a 'weight_map' object)") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        for fname in sorted({str(f) for f in files.values()}):
            if not Path(fname).is_file():
                raise HFCheckpointError(f"{index}: shard {Path(fname).name} listed in 'weight_map' does not exist")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open_checked(single) as handle:
            return {name: single for name in handle.keys()}
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise HFCheckpointError(f"{path}: only safetensors weights are read (pickled .bin/.pt files are not loaded)")
    raise HFCheckpointError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}")


def safe_open_checked(file: Path) -> Any:
    """``safetensors.safe_open`` (numpy) whose errors name the file."""
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as exc:
        raise HFCheckpointError(f"{file}: corrupt or truncated safetensors file: {exc}") from None


class TensorReader:
    """Lazy access to the tensors of an HF folder, with shapes checked against a ``ModelConfig``."""

    def __init__(self, path: Path, files: Mapping[str, Path]):
        self.path = path
        self.files = dict(files)
        self._handles: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open_checked(file))
        return self._handles[file]

    def slice(self, name: str) -> Any:
        """The lazy safetensors slice of tensor ``name`` (index it to read only that part)."""
        file = self.files[name]
        handle = self._handle(file)
        if name not in handle.keys():
            raise HFCheckpointError(f"{file}: tensor {name!r} listed in the index is not in this file")
        return handle.get_slice(name)

    def dtype(self, name: str) -> str:
        """The stored dtype of tensor ``name`` as a numpy name; only float32/bfloat16/float16 are accepted."""
        stored = self.slice(name).get_dtype()
        if stored not in STORED_DTYPES:
            raise HFCheckpointError(f"{self.files[name]}: tensor {name!r} has dtype {stored}; "
                                    f"supported: {', '.join(STORED_DTYPES)}")
        return STORED_DTYPES[stored]

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name``."""
        return tuple(self.slice(name).get_shape())


def _check_tensors(reader: TensorReader, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[TensorRule, int | None]]:
    """Every expected tensor present with the right shape, nothing unexpected; returns the expected map."""
    expected = expected_tensors(cfg)
    ignored = [n for n in reader.files if n not in expected and any(p.match(n) for p in IGNORED)]
    tied_head = [n for n in reader.files if cfg.tie_word_embeddings and n == "lm_head.weight"]
    extra = sorted(set(reader.files) - set(expected) - set(ignored) - set(tied_head))
    if extra:
        shown = ", ".join(f"{n!r} ({reader.files[n].name})" for n in extra[:5])
        raise HFCheckpointError(
            f"{reader.path}: {len(extra)} unexpected tensor(s) for a {cfg.architecture} model with "
            f"{cfg.num_layers} layers: {shown}"
        )
    missing = sorted(set(expected) - set(reader.files))
    if missing:
        raise HFCheckpointError(f"{reader.path}: {len(missing)} missing tensor(s): {', '.join(map(repr, missing[:5]))}")
    if ignored or tied_head:
        log.warning("%s: skipped %d non-parameter tensor(s) (%s)", reader.path, len(ignored) + len(tied_head),
                    ", ".join((ignored + tied_head)[:3]))
    for name, (rule, _) in expected.items():
        want = hf_shape(shapes[rule.ours], rule)
        reader.dtype(name)
        got = reader.shape(name)
        if got != want:
            raise HFCheckpointError(
                f"{reader.files[name]}: tensor {name!r} has shape {list(got)}, expected {list(want)} from the model config"
            )
    return expected


Layout = tuple[tuple[str, tuple[int, ...], np.dtype, jax.sharding.Sharding], ...]


@functools.lru_cache(maxsize=16)
def _zeros(layout: Layout) -> Callable[[], dict[str, jax.Array]]:
    """One jitted function creating every stacked buffer directly in its sharding."""
    return jax.jit(lambda: {k: jnp.zeros(shape, dt) for k, shape, dt, _ in layout},
                   out_shardings={k: sh for k, _, _, sh in layout})


@functools.lru_cache(maxsize=16)
def _set_layer(layout: Layout) -> Callable[..., dict[str, jax.Array]]:
    """One jitted, donated in-place update writing layer ``i`` of every stacked buffer."""

    def update(bufs: dict[str, jax.Array], layer: dict[str, jax.Array], i: jax.Array) -> dict[str, jax.Array]:
        return {k: jax.lax.dynamic_update_index_in_dim(bufs[k], layer[k], i, 0) for k in bufs}

    return jax.jit(update, donate_argnums=0, out_shardings={k: sh for k, _, _, sh in layout})


def _layer_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _read_sharded(reader: TensorReader, name: str, rule: TensorRule, shape: tuple[int, ...], dtype: np.dtype,
                  sharding: jax.sharding.Sharding) -> jax.Array:
    """One HF tensor as a device array of our ``shape``, each distinct shard read once from disk."""
    lazy = reader.slice(name)
    seen: dict[tuple, np.ndarray] = {}

    def fetch(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in seen:
            hf_index = tuple(reversed(index)) if rule.transpose else index
            try:
                part = lazy[hf_index] if hf_index else lazy[:]
            except (SafetensorError, OSError, ValueError) as exc:
                raise HFCheckpointError(f"{reader.files[name]}: cannot read tensor {name!r}: {exc}") from None
            part = np.asarray(part)
            seen[key] = np.ascontiguousarray(part.T if rule.transpose else part).astype(dtype, copy=False)
        return seen[key]

    return jax.make_array_from_callback(shape, sharding, fetch)


def _build_params(reader: TensorReader, params: dict[str, tuple[TensorRule, list[str]]],
                  abstract: dict[str, jax.ShapeDtypeStruct], shardings: dict[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
    """Every parameter on device: unstacked ones directly, stacked ones layer by layer into donated buffers."""
    out: dict[str, jax.Array] = {}
    stacked: dict[str, tuple[TensorRule, list[str]]] = {}
    for key, (rule, names) in params.items():
        if rule.stacked:
            stacked[key] = (rule, names)
        else:
            a = abstract[key]
            out[key] = _read_sharded(reader, names[0], rule, tuple(a.shape), np.dtype(a.dtype), shardings[key])
    if not stacked:
        return out
    layout: Layout = tuple((k, tuple(abstract[k].shape), np.dtype(abstract[k].dtype), shardings[k]) for k in sorted(stacked))
    bufs = _zeros(layout)()
    setter = _set_layer(layout)
    for i in range(len(next(iter(stacked.values()))[1])):
        layer = {
            k: _read_sharded(reader, stacked[k][1][i], stacked[k][0], shape[1:], dt, _layer_sharding(sh))
            for k, shape, dt, sh in layout
        }
        bufs = setter(bufs, layer, jnp.int32(i))
    out.update(bufs)
    return out


def load_pretrained(path: str | Path, mesh: Mesh | None = None, dtype: str | np.dtype | None = None,
                    rules: dict | None = None) -> tuple[Transformer, ModelConfig]:
    """Load an HF Llama/Qwen2/Qwen3/Mistral folder as ``(model, cfg)``.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` or ``model-*.safetensors`` + index.
      mesh: place every parameter directly in its sharding on this mesh (default: the first device).
      dtype: parameter and compute dtype (default: the dtype the tensors are stored in).
      rules: logical-axis rules overriding ``ditto_jax.mesh.DEFAULT_RULES``.
    """
    path = Path(path)
    cfg = from_hf_config(read_hf_config(path), source=str(path / "config.json"))
    with TensorReader(path, weight_files(path)) as reader:
        return build_model(reader, cfg, mesh, dtype, rules)


def build_model(reader: Any, cfg: ModelConfig, mesh: Mesh | None = None, dtype: str | np.dtype | None = None,
                rules: dict | None = None) -> tuple[Transformer, ModelConfig]:
    """``(model, cfg)`` from a reader of HF-named tensors, checked against the mapping table, streamed layer by
    layer into the target sharding.

    ``reader`` has ``path`` (for errors), ``files`` (HF tensor name -> file), ``slice(name)`` (an indexable
    lazy tensor in HF layout), ``dtype(name)`` and ``shape(name)``: ``TensorReader`` for safetensors folders,
    the GGUF reader of ``ditto_jax.checkpoints`` for GGUF files.
    """
    path = reader.path
    if not reader.files:
        raise HFCheckpointError(f"{path}: the checkpoint holds no tensors")
    stored = "model.embed_tokens.weight" if "model.embed_tokens.weight" in reader.files else next(iter(reader.files))
    name = jnp.dtype(dtype).name if dtype is not None else reader.dtype(stored)
    cfg = cfg.model_copy(update={"param_dtype": name, "dtype": name})
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    flat = list(nnx.to_flat_state(abs_state))
    keys = {".".join(map(str, p)): p for p, _ in flat}
    abstract = {k: v.get_value() for k, (_, v) in zip(keys, flat)}
    if mesh is not None:
        by_path = {p: v.get_value() for p, v in nnx.to_flat_state(param_shardings(abs_state, mesh, rules))}
        shardings = {k: by_path[p] for k, p in keys.items()}
    else:
        shardings = {k: SingleDeviceSharding(jax.local_devices()[0]) for k in keys}
    expected = _check_tensors(reader, cfg, {k: tuple(a.shape) for k, a in abstract.items()})
    by_param: dict[str, tuple[TensorRule, list[str]]] = {}
    for tensor, (rule, _) in expected.items():
        by_param.setdefault(rule.ours, (rule, []))[1].append(tensor)
    unfilled = sorted(set(keys) - set(by_param))
    if unfilled:
        raise HFCheckpointError(f"{path}: no rule fills parameter(s) {unfilled} (mapping table incomplete)")
    arrays = _build_params(reader, by_param, abstract, shardings)
    state = nnx.from_flat_state([(p, var.replace(arrays[k])) for k, (p, var) in zip(keys, flat)])
    return nnx.merge(graphdef, state), cfg
