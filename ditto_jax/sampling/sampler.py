"""The device half of sampling: slot state, jitted prefill-into-slots and a chunked decode ``while_loop``.

``Sampler`` owns ``B`` slots. Each slot is a row of one preallocated KV cache (``KVCache [L, B, S, Hkv, D]``
for the model's decode path, ``LayerCache``: one array per layer for the fused path, heads-first on CPU) plus
per-row decoding state (last token, counters, sampling parameters, stop ids, repetition-penalty presence,
constraint state). Two jitted functions act on it, both donating the state so the cache is updated in place:

- ``prefill(rows)``: run ``G`` prompts (right-padded to a length bucket) through the model into a fresh
  ``[L, G, P]`` cache, scatter it into the chosen slots' rows, and sample each prompt's first token.
- ``decode(steps)``: up to ``steps`` decode steps for all slots inside one ``lax.while_loop`` (it exits early
  when every slot is idle), returning the chunk's tokens and log-probabilities for the host.

Shapes are static per ``(G, P)`` bucket for prefill and fixed for decode: after warm-up nothing recompiles.
With a mesh, rows are split over the data axes and cached kv heads over ``tensor``. The jitted functions are
process-wide (``shared_step_functions``): a second sampler over a model of the same structure and config (other
weights: the weights are arguments, never constants) runs the executables the first one compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.mesh import logical_to_spec
from ditto_jax.model import KVCache, LayerCache, decode_step, decode_weights, init_cache, init_layer_cache, read_widths
from ditto_jax.sampling.compile_cache import SavedJit
from ditto_jax.sampling.logits import select_tokens

FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
FINISH_NAMES = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}


@flax.struct.dataclass
class SlotState:
    """Per-slot decoding state (leading axis = slot); see the module docstring."""

    cache: Any  # KVCache (decode_path "model") or LayerCache ("fused")
    last_token: jax.Array  # [B] int32, sampled but not yet fed
    num_generated: jax.Array  # [B] int32
    active: jax.Array  # [B] bool
    finish: jax.Array  # [B] int32 FINISH_*
    key: jax.Array  # [B, 2] uint32 threefry key data of the request
    temperature: jax.Array  # [B] f32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] f32
    repetition_penalty: jax.Array  # [B] f32
    max_new: jax.Array  # [B] int32
    stop_ids: jax.Array  # [B, MS] int32, -1 padded
    presence: jax.Array  # [B, V] bool
    cstate: jax.Array  # [B] int32 global constraint state, -1 = unconstrained
    ccon: jax.Array  # [B] int32 constraint index


@flax.struct.dataclass
class RowParams:
    """Per-request settings for ``G`` rows being prefilled (same fields as ``SlotState``)."""

    key: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    max_new: jax.Array
    stop_ids: jax.Array
    cstate: jax.Array
    ccon: jax.Array


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``."""
    return -(-n // m) * m


CACHE_ALIGN = 64
"""The slot cache's width is a multiple of this. XLA's CPU dots over the keys run ~15% faster per position at
such widths (SmolLM2-135M decode attention, B=8, 30 layers: 8.2 ms at 435 positions, 7.1 ms at 448; the real
decode step 54.3 -> 51.3 ms, median of 7 chunks alternating in one process, 2-core CPU, 2026-12-06)."""


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static shape knobs: slots, cache length, decode chunk, stop-id width, top-k bound, rejection rounds."""

    batch_size: int
    max_len: int
    chunk: int = 16
    max_stop_ids: int = 8
    max_top_k: int = 64
    max_rounds: int = 32
    decode_path: str = "fused"  # "fused": model.decode_step over DecodeWeights; "model": the model's forward
    prefix_rows: int = 0  # rows of the prefix-cache pool (0: no prefix cache)
    prefix_row_tokens: int = 0  # tokens per pool row

    @property
    def cache_len(self) -> int:
        """Positions the slot cache holds: ``max_len`` rounded up to a multiple of ``CACHE_ALIGN``. A request still
        ends at ``max_len``; the positions past it are never written, and decode reads the whole aligned width."""
        return round_up(self.max_len, CACHE_ALIGN)


def _advance_constraint(tables, cstate, ccon, tokens, emit):
    next_state, token_class = tables
    cls = token_class[ccon, tokens]
    nxt = next_state[jnp.maximum(cstate, 0), cls]
    return jnp.where(emit & (cstate >= 0), nxt, cstate)


def _choose(logits, s: SlotState | RowParams, presence, cstate, ccon, num_generated, tables, cfg: SamplerConfig,
            kernel: bool = False):
    """The next tokens and their log-probabilities (``select_tokens``; ``kernel``: by ``kernels.cpu``)."""
    keys = jax.vmap(lambda kd, n: jax.random.fold_in(jax.random.wrap_key_data(kd, impl="threefry2x32"), n))(
        s.key, num_generated)
    tokens, logprobs = select_tokens(
        logits, constraint=(tables, cstate, ccon), presence=presence, temperature=s.temperature, top_k=s.top_k,
        top_p=s.top_p, repetition_penalty=s.repetition_penalty, keys=keys, max_top_k=cfg.max_top_k,
        max_rounds=cfg.max_rounds, kernel=kernel)
    return tokens, logprobs


def _finish_codes(tokens, stop_ids, num_generated, max_new, lengths, max_len, emit):
    is_stop = jnp.any(tokens[:, None] == stop_ids, axis=-1)
    is_len = (num_generated >= max_new) | (lengths >= max_len)
    code = jnp.where(is_stop, FINISH_STOP, jnp.where(is_len, FINISH_LENGTH, FINISH_NONE))
    return jnp.where(emit, code, FINISH_NONE)


def prefix_fill_fn(graphdef, params, pool: KVCache, rows: jax.Array, tokens: jax.Array, *, cpu_kernel: bool = False):
    """Compute the keys/values of ``G`` prefixes ``tokens [G, P]`` into pool rows ``rows [G]`` (``>= R``: padding).
    ``cpu_kernel``: one CPU device with ``kernels.cpu`` (``StepFunctions.build``), the attention by its kernel."""
    model = nnx.merge(graphdef, params)
    g, p = tokens.shape
    small = init_cache(model.cfg, g, p)
    _, small = model(tokens, cache=small, return_hidden=True, cpu_kernel=cpu_kernel)
    r, c = rows[:, None], jnp.arange(p)[None, :]
    return pool.replace(k=pool.k.at[:, r, c].set(small.k.astype(pool.k.dtype), mode="drop"),
                        v=pool.v.at[:, r, c].set(small.v.astype(pool.v.dtype), mode="drop"))


def _slot_prefix(cache: KVCache | LayerCache, slots: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """The first ``width`` cached positions of ``slots [G]`` (``>= B``: padding, any row) as ``[L, G, W, Hkv, D]``."""
    slots = jnp.minimum(slots, cache.batch - 1)
    if isinstance(cache, KVCache):
        return cache.k[:, slots, :width], cache.v[:, slots, :width]
    if cache.heads_first:  # k [B, Hkv, D, S], v [B, Hkv, S, D]
        k = jnp.stack([jnp.transpose(c[slots, :, :, :width], (0, 3, 1, 2)) for c in cache.k])
        v = jnp.stack([jnp.transpose(c[slots, :, :width], (0, 2, 1, 3)) for c in cache.v])
        return k, v
    return jnp.stack([c[slots, :width] for c in cache.k]), jnp.stack([c[slots, :width] for c in cache.v])


def prefill_fn(graphdef, params, state: SlotState, pool: KVCache | None, tables, slots: jax.Array,
               prompts: jax.Array, lengths: jax.Array, src_rows: jax.Array, prefix_len: jax.Array,
               suffix: jax.Array, rows: RowParams, *, cfg: SamplerConfig, from_slots: bool = False,
               final: bool = True, cpu_kernel: bool = False):
    """Prefill ``G`` prompts into ``slots [G]`` (``>= B`` = padding row) and sample their first tokens.

    ``prompts [G, W]`` are the whole prompts (true ``lengths [G]``; for the repetition penalty), ``suffix
    [G, Ps]`` the part after each prompt's cached prefix: ``prefix_len[g]`` tokens read from pool row
    ``src_rows[g]``, or with ``from_slots`` from the slot's own cache (an earlier chunk of the same prompt;
    ``pool`` is None when no row of the group has a prefix, and ``W = Ps``). Only the suffix runs through the
    model, attending to the prefix's cached keys/values.

    ``final=False`` (chunked prefill): the prompt continues in a later call; ``lengths`` is the length so far.
    Only the keys/values are written and the slot stays inactive: nothing is sampled (the returned tokens,
    log-probabilities and codes are placeholders). ``cpu_kernel``: as ``prefix_fill_fn``'s."""
    model = nnx.merge(graphdef, params)
    g, ps = suffix.shape
    mcfg = model.cfg
    pp = prompts.shape[1] - ps  # the prefix part of the width (static)
    pad = [(0, 0), (0, 0), (0, ps), (0, 0), (0, 0)]
    if from_slots:
        k, v = _slot_prefix(state.cache, slots, pp)
        small = KVCache(k=jnp.pad(k, pad), v=jnp.pad(v, pad), lengths=prefix_len)
    elif pool is None:
        small = init_cache(mcfg, g, ps)
    else:
        small = KVCache(k=jnp.pad(pool.k[:, src_rows, :pp], pad), v=jnp.pad(pool.v[:, src_rows, :pp], pad),
                        lengths=prefix_len)
    hidden, small = model(suffix, cache=small, return_hidden=True, cpu_kernel=cpu_kernel)
    if not final:
        return _write_slots(state, small, slots, lengths, active=False), *_placeholders(g)
    last = jnp.take_along_axis(hidden, (lengths - prefix_len - 1)[:, None, None], axis=1)[:, 0]
    logits = model.logits(last)
    vocab = logits.shape[-1]
    valid = jnp.arange(prompts.shape[1])[None, :] < lengths[:, None]
    presence = jnp.zeros((g, vocab), bool).at[jnp.arange(g)[:, None], prompts].max(valid)
    zeros = jnp.zeros((g,), jnp.int32)
    tok, lp = _choose(logits, rows, presence, rows.cstate, rows.ccon, zeros, tables, cfg)
    presence = presence.at[jnp.arange(g), tok].set(True)
    ones = zeros + 1
    code = _finish_codes(tok, rows.stop_ids, ones, rows.max_new, lengths, cfg.max_len, jnp.ones((g,), bool))
    cstate = _advance_constraint(tables, rows.cstate, rows.ccon, tok, jnp.ones((g,), bool))

    state = _write_slots(state, small, slots, lengths, active=code == FINISH_NONE)

    def put(arr, val):
        return arr.at[slots].set(val.astype(arr.dtype), mode="drop")

    new = state.replace(
        last_token=put(state.last_token, tok),
        num_generated=put(state.num_generated, ones),
        finish=put(state.finish, code),
        key=put(state.key, rows.key),
        temperature=put(state.temperature, rows.temperature),
        top_k=put(state.top_k, rows.top_k),
        top_p=put(state.top_p, rows.top_p),
        repetition_penalty=put(state.repetition_penalty, rows.repetition_penalty),
        max_new=put(state.max_new, rows.max_new),
        stop_ids=put(state.stop_ids, rows.stop_ids),
        presence=put(state.presence, presence),
        cstate=put(state.cstate, cstate),
        ccon=put(state.ccon, rows.ccon),
    )
    return new, tok, lp, code


def _write_slots(state: SlotState, small: KVCache, slots: jax.Array, lengths: jax.Array,
                 active: jax.Array | bool) -> SlotState:
    """Scatter the ``G`` rows of ``small`` (``[L, G, W, Hkv, D]``) into ``slots`` (``>= B``: dropped) from
    position 0, set their cache lengths and ``active`` (a slot between prefill chunks also reads finish NONE)."""
    cache = state.cache
    width = small.k.shape[2]
    rows_, cols = slots[:, None], jnp.arange(width)[None, :]
    if isinstance(cache, LayerCache) and cache.heads_first:
        k, v = _select_rows_heads_first(cache, small, slots)
    elif isinstance(cache, LayerCache):  # [G, W, Hkv, D] per layer
        k = tuple(c.at[rows_, cols].set(small.k[i].astype(c.dtype), mode="drop") for i, c in enumerate(cache.k))
        v = tuple(c.at[rows_, cols].set(small.v[i].astype(c.dtype), mode="drop") for i, c in enumerate(cache.v))
    else:
        k = cache.k.at[:, rows_, cols].set(small.k.astype(cache.k.dtype), mode="drop")
        v = cache.v.at[:, rows_, cols].set(small.v.astype(cache.v.dtype), mode="drop")

    def put(arr, val):
        return arr.at[slots].set(jnp.broadcast_to(val, slots.shape).astype(arr.dtype), mode="drop")

    return state.replace(cache=cache.replace(k=k, v=v, lengths=put(cache.lengths, lengths)),
                         active=put(state.active, active), finish=put(state.finish, FINISH_NONE))


def _select_rows_heads_first(cache: LayerCache, small: KVCache, slots: jax.Array):
    """Rows ``small [L, G, W, Hkv, D]`` written over ``slots [G]`` (``>= B``: dropped) of a heads-first cache, whole
    rows (positions from ``W`` on zeroed): each slot gathers its row of ``small`` and a select keeps the slots not
    written. On CPU a scatter into the heads-first layout moves one element at a time; this is faster even where
    few rows go into a long cache (2-core CPU, 30 layers, donated cache: 8 rows of 467 positions into 8 x 435,
    69 vs 17 ms; 3 rows of 512 into 16 x 2048, 123 vs 18 ms; 1 row, 12 vs 7 ms)."""
    b, s_len = cache.batch, cache.max_len
    w = min(small.k.shape[2], s_len)
    hit = slots[None, :] == jnp.arange(b, dtype=slots.dtype)[:, None]  # [B, G]
    src, written = jnp.argmax(hit, axis=1), jnp.any(hit, axis=1)[:, None, None, None]
    pad = [(0, 0), (0, 0), (0, 0), (0, s_len - w)]
    k = tuple(jnp.where(written, jnp.pad(jnp.transpose(small.k[i][src, :w], (0, 2, 3, 1)).astype(c.dtype), pad), c)
              for i, c in enumerate(cache.k))  # [B, Hkv, D, S]
    pad = [(0, 0), (0, 0), (0, s_len - w), (0, 0)]
    v = tuple(jnp.where(written, jnp.pad(jnp.transpose(small.v[i][src, :w], (0, 2, 1, 3)).astype(c.dtype), pad), c)
              for i, c in enumerate(cache.v))  # [B, Hkv, S, D]
    return k, v


def _placeholders(g: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.zeros((g,), jnp.int32), jnp.zeros((g,), jnp.float32), jnp.full((g,), FINISH_NONE, jnp.int32)


def decode_fn(graphdef, weights, state: SlotState, tables, keep: jax.Array, shared: tuple[jax.Array, jax.Array],
              *, cfg: SamplerConfig, mcfg: Any, width: int | None = None):
    """Up to ``cfg.chunk`` decode steps for every active slot; ``keep [B]`` deactivates slots first (host stops).
    ``shared = (lead [B], length [B])``: slots whose caches begin with the same positions (``decode_step``).

    ``weights`` is the model's parameter state (``decode_path="model"``) or its ``DecodeWeights``. ``width``
    (static; fused path): the cache positions read, at least every active slot's length after the chunk.
    Returns ``(state, tokens [B, K] (-1 where nothing was emitted), logprobs [B, K], steps_run)``.
    """
    # the fused path's packed weights vouch for the CPU kernels (one CPU device): the sampler runs there too
    kernel = cfg.decode_path != "model" and weights.cpu_kernels
    if cfg.decode_path == "model":
        model = nnx.merge(graphdef, weights)

        def forward(tokens, cache):
            logits, cache = model(tokens[:, None], cache=cache)
            return logits[:, 0], cache.k, cache.v
    else:
        def forward(tokens, cache):
            logits, cache = decode_step(weights, mcfg, tokens, cache, width=width, shared=shared)
            return logits, cache.k, cache.v

    b, k_steps = state.last_token.shape[0], cfg.chunk
    rows = jnp.arange(b)
    state = state.replace(active=state.active & keep)

    def cond(carry):
        i, s, _, _ = carry
        return (i < k_steps) & jnp.any(s.active)

    def body(carry):
        i, s, out_tok, out_lp = carry
        emit = s.active
        logits, k_all, v_all = forward(s.last_token, s.cache)
        lengths = jnp.where(emit, s.cache.lengths + 1, s.cache.lengths)
        tok, lp = _choose(logits, s, s.presence, s.cstate, s.ccon, s.num_generated, tables, cfg, kernel)
        n = s.num_generated + emit
        code = _finish_codes(tok, s.stop_ids, n, s.max_new, lengths, cfg.max_len, emit)
        s = s.replace(
            cache=s.cache.replace(k=k_all, v=v_all, lengths=lengths),
            last_token=jnp.where(emit, tok, s.last_token),
            num_generated=n,
            active=emit & (code == FINISH_NONE),
            finish=jnp.where(emit, code, s.finish),
            presence=s.presence.at[rows, tok].max(emit),
            cstate=_advance_constraint(tables, s.cstate, s.ccon, tok, emit),
        )
        out_tok = out_tok.at[:, i].set(jnp.where(emit, tok, -1))
        out_lp = out_lp.at[:, i].set(jnp.where(emit, lp, 0.0))
        return i + 1, s, out_tok, out_lp

    init = (jnp.int32(0), state, jnp.full((b, k_steps), -1, jnp.int32), jnp.zeros((b, k_steps), jnp.float32))
    steps, state, out_tok, out_lp = jax.lax.while_loop(cond, body, init)
    return state, out_tok, out_lp, steps


class Sampler:
    """Device-side slots for one model: ``prefill`` and ``decode`` (jitted once per shape), state donated.

    The jitted functions come from ``shared_step_functions``: samplers over models of the same structure and
    config (different weights) run the same compiled executables. ``share_compiled=False`` builds private ones.
    """

    def __init__(self, model: Any, cfg: SamplerConfig, mesh: jax.sharding.Mesh | None = None, *,
                 share_compiled: bool = True):
        self.model_cfg = model.cfg
        self.cfg = cfg
        self.mesh = mesh
        self.vocab_size = model.cfg.vocab_size
        if cfg.decode_path not in ("fused", "model"):
            raise ValueError(f"decode_path must be 'fused' or 'model', got {cfg.decode_path!r}")
        self.graphdef, self.params, graph_cfg = _canonical_split(model)
        if mesh is None:  # committed, like the state: eagerly built and loaded models then share executables
            self.params = jax.device_put(self.params, jax.local_devices()[0])  # no copy when already there
        with _maybe_mesh(mesh):
            self.decode_weights = decode_weights(model) if cfg.decode_path == "fused" else self.params
        if mesh is None:
            self.decode_weights = jax.device_put(self.decode_weights, jax.local_devices()[0])
        self.state = self._init_state()
        self._shardings = None if mesh is None else self._state_shardings()
        # Committed from the start, so the first call compiles the same executable as every later one.
        self.state = jax.device_put(self.state, self._shardings or jax.local_devices()[0])
        self.pool: KVCache | None = None
        if cfg.prefix_rows > 0:
            pool = init_cache(self.model_cfg, cfg.prefix_rows, cfg.prefix_row_tokens)
            self.pool = jax.device_put(pool, self._pool_shardings(pool) if mesh is not None else jax.local_devices()[0])
        make = shared_step_functions if share_compiled else StepFunctions.build
        self._steps = make(self.graphdef, cfg, graph_cfg, mesh, self._shardings)

    def _init_state(self) -> SlotState:
        b, v, ms = self.cfg.batch_size, self.vocab_size, self.cfg.max_stop_ids

        def full(value, dtype, shape=(b,)):  # a fresh buffer per field: the state is donated leaf by leaf
            return jnp.full(shape, value, dtype)

        return SlotState(
            cache=self._init_cache(), last_token=full(0, jnp.int32),
            num_generated=full(0, jnp.int32), active=full(False, bool), finish=full(0, jnp.int32),
            key=full(0, jnp.uint32, (b, 2)), temperature=full(0, jnp.float32), top_k=full(0, jnp.int32),
            top_p=full(1, jnp.float32), repetition_penalty=full(1, jnp.float32), max_new=full(0, jnp.int32),
            stop_ids=full(-1, jnp.int32, (b, ms)), presence=full(False, bool, (b, v)), cstate=full(-1, jnp.int32),
            ccon=full(0, jnp.int32))

    def _init_cache(self) -> KVCache | LayerCache:
        make = init_cache if self.cfg.decode_path == "model" else init_layer_cache
        return make(self.model_cfg, self.cfg.batch_size, self.cfg.cache_len)

    def _state_shardings(self) -> SlotState:
        mesh = self.mesh

        def spec(axes, shape):
            return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

        def for_leaf(x):
            return spec(("batch",) + (None,) * (x.ndim - 1), x.shape)

        s = jax.tree.map(for_leaf, self.state)
        cache = self.state.cache
        if isinstance(cache, LayerCache):
            if cache.heads_first:
                k_axes, v_axes = ("batch", "cache_heads", None, "seq"), ("batch", "cache_heads", "seq", None)
            else:
                k_axes = v_axes = ("batch", "seq", "cache_heads", None)
            k_spec = tuple(spec(k_axes, c.shape) for c in cache.k)
            v_spec = tuple(spec(v_axes, c.shape) for c in cache.v)
        else:
            k_spec = v_spec = spec(("layers", "batch", "seq", "cache_heads", None), cache.k.shape)
        return s.replace(cache=cache.replace(k=k_spec, v=v_spec, lengths=for_leaf(cache.lengths)))

    def _pool_shardings(self, pool: KVCache) -> KVCache:
        mesh = self.mesh
        kv = NamedSharding(mesh, logical_to_spec(("layers", None, None, "cache_heads", None), pool.k.shape, mesh))
        return pool.replace(k=kv, v=kv, lengths=NamedSharding(mesh, PartitionSpec()))

    # Host arrays go in with jax.device_put, never jnp.asarray: under jax 0.10 jnp.asarray compiles a small copy
    # executable ("stage") for every new shape and dtype (31 of the 55 executables of a SmolLM2 bench simulate
    # run) and dispatches it on every call; device_put transfers (a copy) without one.
    def prefix_fill(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        """Compute prefixes ``tokens [G, P]`` into pool rows ``rows [G]`` (``>= prefix_rows``: padding)."""
        with _maybe_mesh(self.mesh):
            self.pool = self._steps.prefix_fill(self.params, self.pool, *jax.device_put((rows, tokens)))
        jax.block_until_ready(self.pool.k)

    def prefill(self, tables, slots: np.ndarray, prompts: np.ndarray, lengths: np.ndarray, rows: RowParams,
                src_rows: np.ndarray | None = None, prefix_len: np.ndarray | None = None,
                suffix: np.ndarray | None = None, *, from_slots: bool = False, final: bool = True):
        """Prefill rows into slots (host arrays in); returns host ``(first_tokens, logprobs, finish_codes)``.

        Without ``suffix`` the whole prompts run through the model; with it, each row's first ``prefix_len``
        tokens come from pool row ``src_rows`` (or, ``from_slots``, from the slot itself: an earlier chunk) and
        ``suffix`` (the rest, left-aligned) runs. ``final=False``: a chunk of a longer prompt (see
        ``prefill_fn``)."""
        g = prompts.shape[0]
        if suffix is None:
            pool, suffix = None, prompts
            src_rows, prefix_len = np.zeros((g,), np.int32), np.zeros((g,), np.int32)
        else:
            pool = None if from_slots else self.pool
        with _maybe_mesh(self.mesh):
            self.state, tok, lp, code = self._steps.prefill(
                self.params, self.state, pool, tables, *jax.device_put((slots, prompts, lengths, src_rows, prefix_len,
                                                                       suffix)), rows,
                from_slots=from_slots, final=final)
        return np.asarray(tok), np.asarray(lp), np.asarray(code)

    def read_width(self, need: int) -> int | None:
        """The static cache width a decode chunk whose slots reach at most ``need`` positions reads: the narrowest
        of ``model.read_widths(cache_len)`` covering it on the fused path's heads-first cache (a few executables),
        None (the whole cache, one executable) otherwise."""
        cache = self.state.cache
        if not isinstance(cache, LayerCache) or not cache.heads_first:
            return None
        widths = read_widths(self.cfg.cache_len)
        return next((w for w in widths if w >= need), widths[-1])

    def decode(self, tables, keep: np.ndarray, width: int | None = None,
               shared: tuple[np.ndarray, np.ndarray] | None = None):
        """One decode chunk reading ``width`` cache positions (``read_width``; None: all); returns host
        ``(tokens [B, K], logprobs [B, K], finish [B], steps)``. ``shared = (lead [B], length [B])`` int32:
        slot ``b``'s first ``length[b]`` cache positions equal slot ``lead[b]``'s (default: none shared)."""
        if shared is None:
            b = len(keep)
            shared = (np.arange(b, dtype=np.int32), np.zeros((b,), np.int32))
        with _maybe_mesh(self.mesh):
            self.state, tok, lp, steps = self._steps.decode(self.decode_weights, self.state, tables,
                                                            *jax.device_put((keep, tuple(shared))), width=width)
        return np.asarray(tok), np.asarray(lp), np.asarray(self.state.finish), int(steps)

    def compile_count(self) -> int:
        """Distinct compiled executables so far (prefill buckets + decode) of this sampler's step functions,
        counting those compiled for any sampler that shares them."""
        return self._steps.compile_count()


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The jitted ``prefill`` and ``decode`` of one (model structure, sampler config, mesh): everything they
    close over is static; weights, slot state and constraint tables are arguments (the state donated)."""

    prefill: Any
    decode: Any
    prefix_fill: Any

    @classmethod
    def build(cls, graphdef: Any, cfg: SamplerConfig, mcfg: Any, mesh: jax.sharding.Mesh | None,
              state_shardings: SlotState | None) -> "StepFunctions":
        """New jitted functions (nothing compiled yet; each compiles per argument shape on first call)."""
        out_state = None if state_shardings is None else (state_shardings, None, None, None)
        # one CPU device (no mesh: the sampler commits the arrays to the first): the prompt phases' attention by
        # kernels.cpu, decided as decode_weights decides the decode step's
        cpu_kernel = cpu_kernels.usable_on(jax.local_devices()[:1] if mesh is None else mesh.devices.flat)
        static = repr((graphdef, cfg, mcfg, state_shardings, decode_compiler_options(), cpu_kernel))
        prefill = SavedJit(jax.jit(functools.partial(prefill_fn, graphdef, cfg=cfg, cpu_kernel=cpu_kernel),
                                   donate_argnums=(1,),
                                   out_shardings=out_state, static_argnames=("from_slots", "final")),
                           "prefill", static)
        decode = SavedJit(jax.jit(functools.partial(decode_fn, graphdef, cfg=cfg, mcfg=mcfg), donate_argnums=(1,),
                                  out_shardings=out_state, compiler_options=decode_compiler_options(),
                                  static_argnames=("width",)), "decode", static)
        prefix_fill = SavedJit(jax.jit(functools.partial(prefix_fill_fn, graphdef, cpu_kernel=cpu_kernel),
                                       donate_argnums=(1,)),
                               "prefix_fill", static)
        return cls(prefill, decode, prefix_fill)

    def compile_count(self) -> int:
        """Compiled executables held by both functions."""
        return self.prefill._cache_size() + self.decode._cache_size() + self.prefix_fill._cache_size()


_SHARED_LIMIT = 16  # distinct model structures x sampler configs kept compiled in one process
_shared: list[tuple[tuple[Any, ...], StepFunctions]] = []  # most recently used last
_shared_lock = threading.Lock()


def shared_step_functions(graphdef: Any, cfg: SamplerConfig, mcfg: Any, mesh: jax.sharding.Mesh | None,
                          state_shardings: SlotState | None) -> StepFunctions:
    """The process-wide ``StepFunctions`` for everything the jitted functions close over: equal graph
    definitions (model structure and config), sampler configs, model configs, meshes, slot-state shardings
    and decode compiler options give the same functions, so a second engine on a same-shaped model compiles
    nothing. Compared with ``==`` (a ``GraphDef`` holding a pydantic config is not hashable); the least
    recently used entry is dropped beyond ``_SHARED_LIMIT``."""
    options = decode_compiler_options()
    key = (graphdef, cfg, mcfg, mesh, state_shardings, None if options is None else sorted(options.items()))
    with _shared_lock:
        for i, (known, steps) in enumerate(_shared):
            if _same_key(known, key):
                _shared.append(_shared.pop(i))
                return steps
        steps = StepFunctions.build(graphdef, cfg, mcfg, mesh, state_shardings)
        _shared.append((key, steps))
        del _shared[:-_SHARED_LIMIT]
        return steps


def _same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return all(x is y or (type(x) is type(y) and bool(x == y)) for x, y in zip(a, b, strict=True))


def clear_shared_step_functions() -> None:
    """Forget every shared ``StepFunctions`` (their executables are freed once no sampler uses them)."""
    with _shared_lock:
        _shared.clear()


def decode_compiler_options() -> dict[str, str] | None:
    """XLA options for the decode loop: none by default. On CPU, XLA's YNNPACK dot fusions were switched off
    here while the cache was ``[B, S, Hkv, D]`` (Eigen ran that step faster); with the heads-first cache the
    default fusions are faster (SmolLM2-135M, B=8, S=448, 2-core CPU, 2026-12-04: 47 vs 58 ms per step).
    ``DITTO_DECODE_YNN=0`` switches them off for this executable, to compare."""

    if jax.default_backend() != "cpu" or os.environ.get("DITTO_DECODE_YNN", "1") != "0":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


def _canonical_split(model: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, params, config)`` of ``nnx.split(model)``, an unset ``head_dim`` in the graph's config
    written out as ``dim_per_head``.

    Only ``dim_per_head`` is read by the model, so both spellings compute the same; writing it one way lets a
    random-init model (``head_dim: null``) and its Hugging Face export (``head_dim`` given) share executables.
    The caller's model is left alone: the change is made on a second module over the same arrays.
    """
    graphdef, params = nnx.split(model)
    cfg = model.cfg
    if cfg.head_dim is not None:
        return graphdef, params, cfg
    twin = nnx.merge(graphdef, params)
    twin.cfg = cfg.model_copy(update={"head_dim": cfg.dim_per_head})
    return *nnx.split(twin), twin.cfg


def _maybe_mesh(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
