"""The CPU decode kernels (``kernels.cpu``): the few-row matmul against numpy, the decode attention against the
plain-XLA heads-first attention, their build cache, and the decode step with them against the step without (and so
against the model's forward)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.kernels.reference import attention_reference
from ditto_jax.model import (
    ModelConfig,
    create_model,
    decode_matmul_kind,
    decode_step,
    decode_weights,
    init_cache,
    init_layer_cache,
)
from ditto_jax.model.xla_attention import cached_chunk_attention, heads_first_query_attention

pytestmark = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler on this machine")


def test_the_kernel_builds_and_loads_here():
    assert cpu_kernels.available(), cpu_kernels.reason()


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 20])
@pytest.mark.parametrize("k,n", [(5, 32), (64, 96), (300, 1024), (576, 8192)])
def test_small_matmul_equals_numpy(m, k, n):
    rng = np.random.RandomState(m * 1000 + k + n)
    x, w = rng.randn(m, k).astype(np.float32), rng.randn(k, n).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.small_matmul)(jnp.asarray(x), cpu_kernels.pack(jnp.asarray(w))))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_small_matmul_keeps_leading_axes_and_runs_inside_loops():
    rng = np.random.RandomState(0)
    w = jnp.asarray(rng.randn(48, 64).astype(np.float32) / 7)
    wp = cpu_kernels.pack(w)
    x = jnp.asarray(rng.randn(4, 1, 48).astype(np.float32))
    assert cpu_kernels.small_matmul(x, wp).shape == (4, 1, 64)

    def body(i, h):  # the decode loop's shape: the packed weight a loop constant
        return jnp.tanh(cpu_kernels.small_matmul(h, wp)[..., :48])

    got = jax.jit(lambda h: jax.lax.fori_loop(0, 5, body, h))(x)
    want = jax.jit(lambda h: jax.lax.fori_loop(0, 5, lambda i, h: jnp.tanh((h @ w)[..., :48]), h))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_concurrent_callers_get_their_own_results():
    """The kernels' workers take one job at a time; a call that finds them busy runs on its own thread."""
    rng = np.random.RandomState(5)
    cases = [(jnp.asarray(rng.randn(8, 256).astype(np.float32)), jnp.asarray(rng.randn(256, 2048).astype(np.float32)))
             for _ in range(4)]
    fn = jax.jit(cpu_kernels.small_matmul)
    want = [np.asarray(x) @ np.asarray(w) for x, w in cases]
    packed = [(x, cpu_kernels.pack(w)) for x, w in cases]
    errors = []

    def worker(i):
        for _ in range(25):
            got = np.asarray(fn(*packed[i]))
            if not np.allclose(got, want[i], rtol=1e-4, atol=1e-3):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_pack_is_a_relayout_and_refuses_what_it_cannot_pack():
    w = jnp.arange(6 * 64, dtype=jnp.float32).reshape(6, 64)
    wp = cpu_kernels.pack(w)
    assert wp.shape == (2, 6, 32)
    np.testing.assert_array_equal(np.asarray(wp[1, 2]), np.asarray(w[2, 32:]))
    np.testing.assert_array_equal(np.asarray(cpu_kernels.unpack(wp)), np.asarray(w))
    assert not cpu_kernels.packable(jnp.zeros((6, 40), jnp.float32))
    assert not cpu_kernels.packable(jnp.zeros((6, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"multiple of 32, got float32\(6, 40\)"):
        cpu_kernels.pack(jnp.zeros((6, 40), jnp.float32))
    with pytest.raises(ValueError, match="packed weight"):
        cpu_kernels.small_matmul(jnp.zeros((2, 5)), wp)


@pytest.mark.parametrize("d", [64, 20])
@pytest.mark.parametrize("s_len", [37, 448])
@pytest.mark.parametrize("window", [None, 5, 100])
def test_decode_attention_equals_the_xla_heads_first_attention(d, s_len, window):
    b, hkv, g = 4, 2, 3
    rng = np.random.RandomState(d + s_len + (window or 0))
    q = jnp.asarray(rng.randn(b, hkv * g, d).astype(np.float32))
    k = jnp.asarray(rng.randn(b, hkv, d, s_len).astype(np.float32))
    v = jnp.asarray(rng.randn(b, hkv, s_len, d).astype(np.float32))
    positions = jnp.asarray([0, 3, s_len // 2, s_len - 1], jnp.int32)  # a row at its first and its last position
    got = np.asarray(jax.jit(cpu_kernels.decode_attention, static_argnums=4)(q, k, v, positions, window))
    want = np.asarray(jax.jit(heads_first_query_attention, static_argnums=4)(q, k, v, positions, window))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # Nothing past a row's position is read: garbage there changes nothing.
    junk = jnp.arange(s_len)[None, None, None, :] > positions[:, None, None, None]
    k2 = jnp.where(junk, jnp.nan, k)
    v2 = jnp.where(jnp.swapaxes(junk, 2, 3), jnp.nan, v)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.decode_attention(q, k2, v2, positions, window)), got)


def test_decode_attention_refuses_mismatched_shapes():
    q, k, v = jnp.zeros((2, 4, 8)), jnp.zeros((2, 2, 8, 16)), jnp.zeros((2, 2, 16, 8))
    with pytest.raises(ValueError, match="want float32 k"):
        cpu_kernels.decode_attention(q, k, v[:, :, :8], jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        cpu_kernels.decode_attention(jnp.zeros((2, 3, 8)), k, v, jnp.zeros((2,), jnp.int32))


def test_build_is_cached_by_content_and_failures_say_why(tmp_path, monkeypatch):
    first = cpu_kernels.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left

    broken = tmp_path / "broken"
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(cpu_kernels.BuildError, match="failed"):
        cpu_kernels.build(broken)
    assert list(broken.iterdir()) == []  # the temporary output is removed
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(cpu_kernels.BuildError, match="no C\\+\\+ compiler found"):
        cpu_kernels.build(broken)


def test_switched_off_the_decode_weights_stay_unpacked():
    code = ("from ditto_jax.kernels import cpu as cpu_kernels; from ditto_jax.model import ModelConfig, create_model, "
            "decode_weights; cfg = ModelConfig(architecture='qwen2', vocab_size=128, hidden_size=32, num_layers=1, "
            "num_heads=4, num_kv_heads=2, intermediate_size=64); w = decode_weights(create_model(cfg, seed=0)); "
            "print(cpu_kernels.available(), cpu_kernels.reason(), w.layers[0]['qkv'].ndim)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DITTO_CPU_KERNELS": "0"}).stdout
    assert out.strip() == "False switched off (DITTO_CPU_KERNELS=0) 2"


@pytest.mark.parametrize("flag, vector_bytes, runs", [
    ("", 64, True), ("", 32, True), ("", 16, False), ("1", 16, True), ("0", 64, False), ("0", 32, False)])
def test_decoding_runs_the_kernels_with_avx2_or_when_asked(monkeypatch, flag, vector_bytes, runs):
    """Without AVX2 or AVX-512 decoding keeps XLA's ops unless DITTO_CPU_DECODE_KERNELS=1; training's kernels run
    anyway."""
    assert cpu_kernels.available()
    monkeypatch.setattr(cpu_kernels._lib, "ditto_vector_bytes", lambda: vector_bytes)
    monkeypatch.setenv(cpu_kernels.DECODE_ENV, flag)
    device = jax.devices()[:1]
    assert (cpu_kernels.decode_reason() is None) == runs == cpu_kernels.decode_usable_on(device)
    assert cpu_kernels.usable_on(device) and cpu_kernels.matmul_available()
    cfg = ModelConfig(architecture="qwen2", vocab_size=128, hidden_size=32, num_layers=1, num_heads=4,
                      num_kv_heads=2, intermediate_size=64)
    weights = decode_weights(create_model(cfg, seed=0))
    assert weights.cpu_kernels == runs and weights.layers[0]["qkv"].ndim == (3 if runs else 2)
    kind = decode_matmul_kind(weights)
    assert kind == "cpu kernels" if runs else kind.startswith("xla (cpu kernels: ")
    if not runs:
        assert ("neither AVX2 nor AVX-512" in kind) == (flag == "")


def test_the_library_reports_its_vector_width():
    assert cpu_kernels._lib.ditto_vector_bytes() in (16, 32, 64)


def test_decode_step_over_packed_weights_equals_the_unpacked_one_and_the_forward():
    # hidden 40: q/k/v 40+20+20 = 80 and o 40 are not multiples of 32 (XLA's dot), gate/up 128, down 40 (XLA),
    # the tied head 160 (packed): both kinds in one step.
    cfg = ModelConfig(architecture="qwen2", vocab_size=160, hidden_size=40, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=64, qkv_bias=True, max_position_embeddings=64)
    model = create_model(cfg, seed=7)
    packed, plain = decode_weights(model), decode_weights(model, cpu_kernel=False)
    assert packed.cpu_kernels and not plain.cpu_kernels
    assert [packed.layers[0][n].ndim for n in ("qkv", "o", "gate_up", "down")] == [2, 2, 3, 2]
    assert packed.head.ndim == 3 and plain.head.ndim == 2 and plain.layers[0]["gate_up"].ndim == 2
    rng = np.random.RandomState(2)
    seq = rng.randint(0, 160, (3, 6)).astype(np.int32)
    reference = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, seq))
    step = jax.jit(lambda w, t, c: decode_step(w, cfg, t, c))
    caches = {"packed": init_layer_cache(cfg, 3, 16, heads_first=True)}
    caches["plain"] = caches["packed"]
    for t in range(seq.shape[1]):
        got = {}
        for name, w in (("packed", packed), ("plain", plain)):
            got[name], caches[name] = step(w, jnp.asarray(seq[:, t]), caches[name])
        np.testing.assert_allclose(np.asarray(got["packed"]), np.asarray(got["plain"]), atol=2e-6, rtol=0)
        np.testing.assert_allclose(np.asarray(got["packed"]), reference[:, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 40])
def test_decode_attention_over_shared_prefixes_is_bit_identical(window):
    """Rows whose caches begin with the same positions (as prefix-cache copies do) read them once: the outputs are
    bit-identical to reading every row's own cache; a window, or a lead that is not a row's own lead, turns
    sharing off for that row."""
    rng = np.random.default_rng(0)
    b, hkv, g, d, s = 8, 3, 3, 64, 448
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)).astype(np.float32))
    k = rng.standard_normal((b, hkv, d, s)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    for row, lead, n in ((1, 0, 310), (2, 0, 310), (3, 0, 310), (5, 4, 297), (7, 4, 297)):
        k[row, :, :, :n], v[row, :, :n] = k[lead, :, :, :n], v[lead, :, :n]
    pos = jnp.asarray(np.array([340, 320, 309, 400, 300, 330, 350, 299], np.int32))  # row 2 ends inside the prefix
    lead = jnp.asarray(np.array([0, 0, 0, 0, 4, 4, 6, 4], np.int32))
    length = jnp.asarray(np.array([0, 310, 310, 310, 0, 297, 0, 297], np.int32))
    k, v = jnp.asarray(k), jnp.asarray(v)
    plain = np.asarray(cpu_kernels.decode_attention(q, k, v, pos, window))
    shared = jax.jit(lambda *a: cpu_kernels.decode_attention(*a[:4], window, shared=a[4:]))
    assert np.array_equal(np.asarray(shared(q, k, v, pos, lead, length)), plain)
    # a claim the kernel cannot use (lead after the row, or a lead that is itself led) is ignored
    odd = jnp.asarray(np.array([0, 2, 1, 0, 4, 4, 6, 5], np.int32))
    assert np.array_equal(np.asarray(shared(q, k, v, pos, odd, length)), plain)
    if window is None:  # and a wrong claim does change the result: the kernel really reads the lead's cache
        wrong = jnp.asarray(np.array([0, 0, 0, 0, 4, 4, 4, 4], np.int32))
        assert not np.array_equal(np.asarray(shared(q, k, v, pos, wrong, length.at[6].set(200))), plain)


@pytest.mark.parametrize("window", [None, 40])
def test_decode_attention_writing_the_new_keys_and_values_equals_scattering_them_first(window):
    """With ``new_kv`` the kernel writes each row's new key and value at its position in place (the caches are
    aliased to its outputs; a position past the end is dropped) and then attends: the caches and the outputs
    equal XLA's scatter followed by the kernel, shared prefixes included."""
    rng = np.random.default_rng(1)
    b, hkv, g, d, s = 6, 2, 3, 64, 96
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)).astype(np.float32))
    k = rng.standard_normal((b, hkv, d, s)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    for row in (1, 2):
        k[row, :, :, :50], v[row, :, :50] = k[0, :, :, :50], v[0, :, :50]
    k, v = jnp.asarray(k), jnp.asarray(v)
    k_new = jnp.asarray(rng.standard_normal((b, hkv, d)).astype(np.float32))
    v_new = jnp.asarray(rng.standard_normal((b, hkv, d)).astype(np.float32))
    pos = jnp.asarray(np.array([70, 60, 95, 0, 96, 33], np.int32))  # row 4 is past the end: its write is dropped
    shared = (jnp.asarray(np.array([0, 0, 0, 3, 4, 5], np.int32)), jnp.asarray(np.array([0, 50, 50, 0, 0, 0],
                                                                                        np.int32)))
    rows = jnp.arange(b)
    k_want = k.at[rows, :, :, pos].set(k_new, mode="drop")
    v_want = v.at[rows, :, pos].set(v_new, mode="drop")
    o_want = cpu_kernels.decode_attention(q, k_want, v_want, pos, window, shared=shared)

    @jax.jit
    def step(q, k, v):
        return cpu_kernels.decode_attention(q, k, v, pos, window, shared=shared, new_kv=(k_new, v_new))

    o, k_got, v_got = step(q, k, v)
    np.testing.assert_array_equal(np.asarray(k_got), np.asarray(k_want))
    np.testing.assert_array_equal(np.asarray(v_got), np.asarray(v_want))
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_want))
    with pytest.raises(ValueError, match="new k/v"):
        cpu_kernels.decode_attention(q, k, v, pos, new_kv=(k_new[:, :1], v_new))


@pytest.mark.parametrize("b,t,hq,hkv,d,s,offsets", [
    (2, 5, 4, 2, 20, 37, [0, 10]),  # a head size off the 32-column tiles, a short cache
    (3, 70, 6, 3, 64, 200, [0, 100, 150]),  # several query blocks, rows at different offsets
    (2, 40, 2, 1, 32, 64, [30, 0]),  # the last queries of row 0 run past the cache: every key visible
])
def test_chunk_attention_equals_the_xla_chunk_attention(b, t, hq, hkv, d, s, offsets):
    rng = np.random.default_rng(b * t + s)
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)).astype(np.float32))
    v = jnp.asarray(rng.standard_normal((b, s, hkv, d)).astype(np.float32))
    off = jnp.asarray(np.array(offsets, np.int32))
    want = np.asarray(jax.jit(cached_chunk_attention)(q, k, v, off))
    got = np.asarray(jax.jit(cpu_kernels.chunk_attention)(q, k, v, off))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    # one layer of a stacked cache, read in place: the same values; the other layers are never read
    layers = jnp.stack([jnp.full_like(k, jnp.nan), k, jnp.full_like(k, jnp.nan)])
    values = jnp.stack([jnp.full_like(v, jnp.nan), v, jnp.full_like(v, jnp.nan)])
    stacked = jax.jit(cpu_kernels.chunk_attention)(q, layers, values, off, jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(stacked), got)
    # causal: keys past a query's position change nothing (NaN there would poison every sum that read it)
    pos = jnp.arange(s)[None, :, None, None]
    last = off[:, None, None, None] + t - 1
    poisoned = np.asarray(cpu_kernels.chunk_attention(q, jnp.where(pos > last, jnp.nan, k),
                                                      jnp.where(pos > last, jnp.nan, v), off))
    np.testing.assert_array_equal(poisoned, got)


def test_chunk_attention_refuses_mismatched_shapes():
    q, k = jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 16, 2, 8))
    with pytest.raises(ValueError, match="chunk_attention"):
        cpu_kernels.chunk_attention(q, k, k[:, :, :1], jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        cpu_kernels.chunk_attention(jnp.zeros((2, 4, 3, 8)), k, k, jnp.zeros((2,), jnp.int32))


def test_matmul_loads_openblas_here():
    assert cpu_kernels.matmul_available(), cpu_kernels.matmul_reason()


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (37, 19, 3), (5, 64, 130), (300, 33, 17), (67, 0, 9)])
def test_matmul_equals_numpy(trans_a, trans_b, m, k, n):
    """Rows split (M >= N) or columns split (N > M) over the workers, parts that are not multiples of 16, one row,
    an empty contraction; either operand read transposed in place."""
    rng = np.random.RandomState(m * 100 + k + n)
    a, b = rng.randn(m, k).astype(np.float32), rng.randn(k, n).astype(np.float32)
    a_in, b_in = (a.T.copy() if trans_a else a), (b.T.copy() if trans_b else b)
    got = np.asarray(jax.jit(lambda x, y: cpu_kernels.matmul(x, y, trans_a=trans_a, trans_b=trans_b))(a_in, b_in))
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-5, atol=1e-5 * np.sqrt(k + 1))


@pytest.mark.parametrize("trans_b", [False, True])
def test_matmul_reads_one_layer_of_a_stack_in_place(trans_b):
    """``layer`` picks one matrix of a stacked ``[L, ., .]`` b, traced inside a scan too; the other layers (NaN)
    are never read, and a layer out of range is refused by the kernel."""
    rng = np.random.RandomState(7)
    a, b = rng.randn(37, 19).astype(np.float32), rng.randn(19, 40).astype(np.float32)
    b_in = b.T.copy() if trans_b else b
    stack = jnp.stack([jnp.full(b_in.shape, jnp.nan), jnp.asarray(b_in), jnp.full(b_in.shape, jnp.nan)])
    got = jax.jit(lambda x, w, i: cpu_kernels.matmul(x, w, trans_b=trans_b, layer=i))(a, stack, 1)
    np.testing.assert_allclose(np.asarray(got), a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5 * np.sqrt(20))
    rows = jax.jit(lambda x, w: cpu_kernels.matmul_rows(x, w, trans_b=trans_b, layer=jnp.int32(1)))(
        a.reshape(1, 37, 19), stack)
    np.testing.assert_array_equal(np.asarray(rows)[0], np.asarray(got))
    scanned = jax.jit(lambda x, w: jax.lax.scan(
        lambda c, i: (c, cpu_kernels.matmul(x, w, trans_b=trans_b, layer=i)), 0, jnp.arange(3))[1])(a, stack)
    assert np.isnan(np.asarray(scanned)[0]).all() and np.isnan(np.asarray(scanned)[2]).all()
    np.testing.assert_array_equal(np.asarray(scanned)[1], np.asarray(got))
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(cpu_kernels.matmul(jnp.asarray(a), stack, trans_b=trans_b, layer=3))
    with pytest.raises(ValueError, match="scalar layer"):
        cpu_kernels.matmul(jnp.asarray(a), jnp.asarray(b_in), trans_b=trans_b, layer=0)


def test_the_cached_forward_reads_the_stacked_weights_in_place():
    """A prompt phase's forward (``cache=``) with the kernels: each layer product reads its matrix of the stacked
    weight in place (no scan slice of a layer matrix is copied) and equals the forward with XLA's dots."""
    cfg = ModelConfig(architecture="qwen2", vocab_size=160, hidden_size=64, num_layers=3, num_heads=4,
                      num_kv_heads=2, intermediate_size=96, qkv_bias=True, max_position_embeddings=64)
    model = create_model(cfg, seed=2)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 160, (2, 12)), jnp.int32)
    cache = init_cache(cfg, 2, 16)
    run = nnx.jit(lambda m, ids, c, kernel: m(ids, cache=c, cpu_kernel=kernel), static_argnums=3)
    want, want_cache = run(model, tokens, cache, False)
    got, got_cache = run(model, tokens, cache, True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_cache.k), np.asarray(want_cache.k), atol=2e-5, rtol=1e-5)
    graphdef, state = nnx.split(model)
    hlo = jax.jit(lambda s, ids, c: nnx.merge(graphdef, s)(ids, cache=c, cpu_kernel=True)).lower(
        state, tokens, cache).compile().as_text()
    assert hlo.count(f'custom_call_target="{cpu_kernels.GEMM_LAYER}"') == 7  # q, k, v, o, gate, up, down
    per_layer = {"[64,64]", "[64,32]", "[64,96]", "[96,64]"}  # a layer's q, k/v, gate/up, o, down
    copied = [ln for ln in hlo.splitlines() if "dynamic-slice" in ln and any(f"f32{s}" in ln.split("=")[1][:30]
                                                                              for s in per_layer)]
    assert not copied, copied


def test_matmul_refuses_what_it_cannot_multiply():
    a = jnp.zeros((4, 8), jnp.float32)
    with pytest.raises(ValueError, match="do not multiply"):
        cpu_kernels.matmul(a, jnp.zeros((4, 8), jnp.float32))
    with pytest.raises(ValueError, match="float32 matrices"):
        cpu_kernels.matmul(a.astype(jnp.bfloat16), jnp.zeros((8, 2), jnp.bfloat16))
    with pytest.raises(ValueError, match="float32 matrices"):
        cpu_kernels.matmul(jnp.zeros((2, 4, 8), jnp.float32), jnp.zeros((8, 2), jnp.float32))


def test_matmul_switched_off_says_why():
    code = "from ditto_jax.kernels import cpu; print(cpu.available(), cpu.matmul_available(), cpu.matmul_reason())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DITTO_CPU_BLAS": "0"}).stdout
    assert out.strip() == "True False switched off (DITTO_CPU_BLAS=0)"


def test_an_executable_holding_the_matmul_call_runs_once_the_kernels_load():
    """A saved executable (``sampling.compile_cache.SavedJit``) is not traced again, so nothing calls ``matmul``
    before it runs: loading the kernels must already hand OpenBLAS's sgemm over."""
    code = ("import jax, jax.numpy as jnp; from ditto_jax.kernels import cpu; assert cpu.available(); "
            "out = jax.ffi.ffi_call(cpu.GEMM, jax.ShapeDtypeStruct((2, 3), jnp.float32))(jnp.ones((2, 4)), "
            "jnp.ones((4, 3)), trans_a=False, trans_b=False); print(float(out.sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "24.0"


@pytest.mark.parametrize("b,s,hq,hkv,d", [(2, 37, 4, 2, 16), (3, 130, 6, 3, 8), (1, 64, 2, 1, 32), (1, 1, 1, 1, 4)])
def test_causal_attention_and_its_gradients_equal_the_reference(b, s, hq, hkv, d):
    """Packed rows (two segments and padding), grouped heads, rows that end inside a 64-row block and inside a
    16-wide vector; forward and the three gradients against autodiff of the reference."""
    rng = np.random.RandomState(s + hq)
    q = jnp.asarray(rng.randn(b, s, hq, d).astype(np.float32))
    k, v = (jnp.asarray(rng.randn(b, s, hkv, d).astype(np.float32)) for _ in range(2))
    seg = np.ones((b, s), np.int32)
    seg[:, s // 3:] = 2
    seg[:, s - s // 8:] = 0
    seg = jnp.asarray(seg)
    g = jnp.asarray(rng.randn(b, s, hq, d).astype(np.float32))

    def ref(q, k, v):
        return attention_reference(q, k, v, causal=True, segment_ids=seg)

    def ker(q, k, v):
        return cpu_kernels.causal_attention(q, k, v, seg)

    np.testing.assert_allclose(jax.jit(ker)(q, k, v), jax.jit(ref)(q, k, v), atol=2e-6)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(ker(*a) * g), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a) * g), argnums=(0, 1, 2)))(q, k, v)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, atol=1e-5 * max(1.0, float(jnp.abs(w).max())))


def test_causal_attention_refuses_mismatched_shapes():
    q, k = jnp.zeros((2, 8, 4, 16)), jnp.zeros((2, 8, 2, 16))
    seg = jnp.ones((2, 8), jnp.int32)
    with pytest.raises(ValueError, match="causal_attention"):
        cpu_kernels.causal_attention(q, k, k[..., :8], seg)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        cpu_kernels.causal_attention(jnp.zeros((2, 8, 3, 16)), k, k, seg)
    with pytest.raises(ValueError, match="segment ids"):
        cpu_kernels.causal_attention(q, k, k, seg[:, :4])
