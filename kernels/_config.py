"""Kernel choice and tuning: which lowering runs, with which block sizes.

Backends (``backend=`` argument of the kernels, or the ``DITTO_ATTN_BACKEND`` environment variable):
- ``mosaic_gpu``: Pallas Mosaic GPU (Hopper: TMA, wgmma, warp specialisation); bf16/fp16, head dim % 64 == 0.
- ``triton``: Pallas Triton lowering (any NVIDIA/AMD GPU, any dtype).
- ``mosaic_tpu``: Pallas Mosaic TPU.
- ``interpret``: the ``triton`` kernels run by the generic Pallas interpreter (CPU; slow, for tests).
- ``tpu_interpret``: the ``mosaic_tpu`` kernels run by the TPU interpreter (CPU; tests the TPU lowering's logic).
- ``mosaic_gpu_interpret``: the ``mosaic_gpu`` kernels run by the GPU interpreter (CPU; tests their logic).
- ``auto``: ``mosaic_tpu`` on TPU, ``mosaic_gpu`` on Hopper when the shape allows (else ``triton``),
  ``interpret`` on CPU.

Block sizes come from ``BlockSizes`` defaults per backend, overridden by ``DITTO_ATTN_BLOCKS`` (e.g.
``"block_q=128,block_kv=64,num_warps=8,num_stages=3"``) and then by an explicit ``block_sizes=`` argument,
so a GPU tuning run can sweep them without code changes. ``parse_backend_spec`` / ``parse_decode_spec`` read
``backend@field=value;...`` specs (the kernel benchmark's tiling sweep) and ``check_tiles`` rejects tiles a
lowering cannot compile, naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from functools import lru_cache
from types import ModuleType

import jax

BACKENDS = ("auto", "mosaic_gpu", "triton", "mosaic_tpu", "interpret", "tpu_interpret", "mosaic_gpu_interpret")
BACKEND_ENV = "DITTO_ATTN_BACKEND"
BLOCKS_ENV = "DITTO_ATTN_BLOCKS"
DECODE_BLOCKS_ENV = "DITTO_DECODE_BLOCKS"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters of the flash-attention kernels (hashable: a static argument).

    ``block_q``/``block_kv`` tile the forward pass; ``*_dq``/``*_dkv`` the two backward kernels (None = the
    forward value). ``num_warps``/``num_stages`` go to Triton; ``max_concurrent_steps`` is the Mosaic GPU
    pipeline depth (TMA stages in flight); ``mgpu_bwd=1`` runs the Mosaic GPU backward kernels.
    """

    block_q: int = 128
    block_kv: int = 128
    block_q_dq: int | None = None
    block_kv_dq: int | None = None
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None
    max_concurrent_steps: int = 2
    mgpu_bwd: int = 0  # 1: Mosaic GPU backward kernels (experimental) instead of Triton on the mosaic_gpu path

    @property
    def dq(self) -> tuple[int, int]:
        """``(block_q, block_kv)`` of the dq kernel."""
        return self.block_q_dq or self.block_q, self.block_kv_dq or self.block_kv

    @property
    def dkv(self) -> tuple[int, int]:
        """``(block_q, block_kv)`` of the dk/dv kernel."""
        return self.block_q_dkv or self.block_q, self.block_kv_dkv or self.block_kv

    def replace(self, **changes: int | None) -> "BlockSizes":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Tiles of the decode kernel: ``block_kv`` cache rows per step, ``num_splits`` split-K partitions
    (None = chosen from the shape so the grid fills the chip), Triton ``num_warps``/``num_stages``."""

    block_kv: int = 128
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def replace(self, **changes: int | None) -> "DecodeBlockSizes":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


DEFAULT_BLOCKS = {
    # Hopper, D=128 bf16: 2 consumer warpgroups x 64 query rows, 128 kv rows per TMA stage.
    "mosaic_gpu": BlockSizes(block_q=64, block_kv=128, block_q_dq=64, block_kv_dq=64, block_q_dkv=64,
                             block_kv_dkv=64, max_concurrent_steps=2),
    "triton": BlockSizes(block_q=128, block_kv=64, block_q_dq=64, block_kv_dq=64, block_q_dkv=64,
                         block_kv_dkv=64, num_warps=None, num_stages=3, num_warps_bwd=8, num_stages_bwd=2),
    "mosaic_tpu": BlockSizes(block_q=512, block_kv=512, block_q_dq=256, block_kv_dq=512, block_q_dkv=256,
                             block_kv_dkv=512),
}

# Decode tiles per accelerator (``device_kind`` of the first device); any other device (CPU, TPU, other GPUs)
# gets ``DecodeBlockSizes()``. H200: the tuning sweep's fastest spec of the 2026-12-04 lease,
# ``pallas:triton@block_kv=64;num_stages=4;num_splits=8``: 61.5% of copy bandwidth at B=32, cache 8192,
# Hq/Hkv 32/8, D=128 bf16, against 54.3% for ``DecodeBlockSizes()`` in the same run
# (benchmarks/gpu-h200-2026-12-04.md).
DEFAULT_DECODE_BLOCKS = {
    "NVIDIA H200": DecodeBlockSizes(block_kv=64, num_splits=8, num_warps=4, num_stages=4),
}


def _parse_kv(text: str, source: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{source}: expected key=value, got {item!r}")
        key, value = key.strip(), value.strip()
        if value.lower() == "none":
            out[key] = None
            continue
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"{source}: {key}={value!r} is not an integer (or none)") from None
    return out


def _field_changes(text: str, source: str, cls) -> dict[str, int | None]:
    """Comma-separated ``field=value`` pairs of the dataclass ``cls``; an unknown field is named."""
    fields = {f.name for f in dataclasses.fields(cls)}
    changes = _parse_kv(text, source)
    unknown = set(changes) - fields
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(fields)}")
    return changes


def _with_env(blocks, env_name: str):
    """``blocks`` updated with the ``key=value`` pairs of the environment variable ``env_name`` (if set)."""
    env = os.environ.get(env_name)
    if not env:
        return blocks
    return blocks.replace(**_field_changes(env, env_name, type(blocks)))


def default_blocks(backend: str, override: BlockSizes | None = None) -> BlockSizes:
    """Block sizes for ``backend`` (its family default, then ``DITTO_ATTN_BLOCKS``, then ``override``)."""
    if override is not None:
        return override
    family = {"interpret": "triton", "tpu_interpret": "mosaic_tpu", "mosaic_gpu_interpret": "mosaic_gpu"}
    return _with_env(DEFAULT_BLOCKS[family.get(backend, backend)], BLOCKS_ENV)


def default_decode_blocks(override: DecodeBlockSizes | None = None,
                          device_kind: str | None = None) -> DecodeBlockSizes:
    """Decode tiles: the device's default (``DEFAULT_DECODE_BLOCKS``, by ``device_kind``, default the first
    device's), then ``DITTO_DECODE_BLOCKS``, then ``override``."""
    if override is not None:
        return override
    kind = device_kind if device_kind is not None else first_device_kind()
    return _with_env(DEFAULT_DECODE_BLOCKS.get(kind, DecodeBlockSizes()), DECODE_BLOCKS_ENV)


@lru_cache(maxsize=None)
def first_device_kind() -> str:
    """``device_kind`` of the first device of the default backend (e.g. ``NVIDIA H200``, ``cpu``)."""
    return jax.devices()[0].device_kind


@lru_cache(maxsize=None)
def gpu_compute_capability() -> tuple[int, int] | None:
    """``(major, minor)`` of the first GPU, or None without one."""
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return None
    cc = getattr(dev, "compute_capability", None)
    if not cc:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def platform() -> str:
    """``tpu`` | ``gpu`` | ``cpu`` of the default backend."""
    return jax.default_backend()


def resolve_backend(backend: str | None, *, mosaic_gpu_ok: bool = True) -> str:
    """The concrete backend for a request (``None`` reads ``DITTO_ATTN_BACKEND``, default ``auto``).

    ``mosaic_gpu_ok`` says whether the call's shape and dtype suit the Mosaic GPU kernels; ``auto`` falls
    back to Triton when they don't, an explicit ``mosaic_gpu`` raises.
    """
    backend = backend or os.environ.get(BACKEND_ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} not in {BACKENDS}")
    if backend != "auto":
        return backend
    plat = platform()
    if plat == "tpu":
        return "mosaic_tpu"
    if plat == "gpu":
        cc = gpu_compute_capability()
        if mosaic_gpu_ok and cc is not None and cc[0] == 9:
            return "mosaic_gpu"
        return "triton"
    return "interpret"


def check_tiles(backend: str, blocks: "BlockSizes | DecodeBlockSizes", source: str = "tiles") -> None:
    """Raise ``ValueError`` naming the field when ``blocks`` cannot compile on ``backend`` (a concrete name).

    Triton tiles are powers of two >= 16 (tensor-core dots); Mosaic GPU forward tiles are multiples of 64
    (wgmma), and so are its own backward's (``mgpu_bwd=1``; otherwise the backward is Triton). The
    interpreters take any positive size.
    """
    mgpu_bwd = getattr(blocks, "mgpu_bwd", 0)
    for f in dataclasses.fields(blocks):
        key, value = f.name, getattr(blocks, f.name)
        if value is None:
            continue
        if key == "mgpu_bwd":
            if value not in (0, 1):
                raise ValueError(f"{source}: mgpu_bwd={value} must be 0 or 1")
            continue
        if value < 1:
            raise ValueError(f"{source}: {key}={value} must be positive")
        if key in ("num_warps", "num_warps_bwd") and (value & (value - 1) or value > 16):
            raise ValueError(f"{source}: {key}={value} must be a power of two <= 16")
        if not key.startswith("block_") or backend not in ("triton", "mosaic_gpu"):
            continue
        wgmma = backend == "mosaic_gpu" and (key in ("block_q", "block_kv") or mgpu_bwd)
        if wgmma and value % 64:
            raise ValueError(f"{source}: {key}={value} must be a multiple of 64 for the Mosaic GPU kernels")
        if not wgmma and (value & (value - 1) or value < 16):
            raise ValueError(f"{source}: {key}={value} must be a power of two >= 16 for the Triton kernels")


def parse_decode_spec(spec: str | None) -> tuple[str | None, DecodeBlockSizes | None]:
    """``backend[@field=value;...]`` -> ``(backend or None, DecodeBlockSizes or None)`` for the decode kernel.

    Fields are those of ``DecodeBlockSizes`` over its generic defaults (not a device's ``DEFAULT_DECODE_BLOCKS``,
    so a spec names the same tiles on every device; ``DITTO_DECODE_BLOCKS`` applies first), e.g.
    ``triton@block_kv=64;num_splits=8;num_stages=3``. Without ``@`` the kernel uses the device's defaults.
    """
    if not spec:
        return None, None
    backend, _, tiles = spec.partition("@")
    backend = backend or None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{spec}: attention backend {backend!r} not in {BACKENDS}")
    if not tiles:
        return backend, None
    changes = _field_changes(tiles.replace(";", ","), spec, DecodeBlockSizes)
    concrete = resolve_backend(backend, mosaic_gpu_ok=False)
    blocks = default_decode_blocks(device_kind="").replace(**changes)
    check_tiles("triton" if concrete in ("triton", "mosaic_gpu") else concrete, blocks, spec)
    return backend, blocks


def parse_backend_spec(spec: str | None) -> tuple[str | None, BlockSizes | None]:
    """``backend[@field=value;...]`` -> ``(backend or None, BlockSizes or None)``.

    The ``@`` part overrides the backend's default tiles, so one run can compare tilings and variants,
    e.g. ``triton@block_q_dkv=128;num_warps_bwd=8`` or ``mosaic_gpu@mgpu_bwd=1``.
    """
    if not spec:
        return None, None
    backend, _, tiles = spec.partition("@")
    backend = backend or None
    if not tiles:
        return backend, None
    concrete = resolve_backend(backend)
    blocks = default_blocks(concrete).replace(**_field_changes(tiles.replace(";", ","), spec, BlockSizes))
    check_tiles(concrete, blocks, spec)
    return backend, blocks


def load_backend(module: str) -> ModuleType:
    """The Pallas backend module ``ditto_jax.kernels.<module>``, imported on first use: importing Mosaic GPU's
    and Mosaic TPU's Pallas takes ~0.25 s (a third of ``ditto_jax.kernels``'s import), which a run on another
    platform never needs. The only imports of the kernels that are not at the top of a module."""
    return importlib.import_module(f"ditto_jax.kernels.{module}")
