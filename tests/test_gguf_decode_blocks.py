"""The decode step reading a GGUF file's Q4_0/Q4_1/Q8_0 blocks (``kernels.cpu.QuantWeight``) instead of a float
copy: the blocks decode to exactly the float32 weights ``gguf`` dequantises, the kernel's sums equal the float
kernel's bit for bit, a loaded GGUF model decodes the same logits with and without its blocks (Q/K rows of a
llama file un-permuted, mixed types keep the float copy), greedy generation matches transformers, and the blocks
are dropped once the parameters change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from gguf import GGMLQuantizationType as Q
from gguf import quants
from gguf_fixtures import transformers_model, write_gguf

from ditto_jax.checkpoints import ModelSource, load_model_source
from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.model import decode_matmul_kind, decode_step, decode_weights, init_layer_cache, set_decode_source
from ditto_jax.sampling import Request, SamplingEngine, SamplingParams

pytestmark = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler on this machine")

KINDS = ("Q4_0", "Q4_1", "Q8_0")


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_decode_to_ggufs_float32_values_and_the_sums_equal_the_float_kernels(kind):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 160)).astype(np.float32)  # [N, K] as GGUF stores a matrix
    blocks = quants.quantize(w, getattr(Q, kind))
    want = quants.dequantize(blocks, getattr(Q, kind)).astype(np.float32).T  # [K, N]
    wq = cpu_kernels.quant_weight(cpu_kernels.pack_gguf(kind, blocks))
    assert wq.shape == (160, 96) and wq.bits == (8 if kind == "Q8_0" else 4)
    assert np.array_equal(cpu_kernels.dequantize(wq), want)
    packed = cpu_kernels.pack(jnp.asarray(want))
    for rows in (1, 3, 4, 8, 13):  # one pass; with AVX2 a 2-row decoding pass and then 3-row ones
        x = jnp.asarray(rng.standard_normal((rows, 160)).astype(np.float32))
        got = np.asarray(jax.jit(cpu_kernels.small_matmul)(x, wq))
        assert np.array_equal(got, np.asarray(cpu_kernels.small_matmul(x, packed)))
        np.testing.assert_allclose(got, np.asarray(x) @ want, rtol=1e-5, atol=1e-4)
    both = cpu_kernels.concat_quant([wq, wq])
    assert np.array_equal(cpu_kernels.dequantize(both), np.concatenate([want, want], axis=1))


@pytest.mark.parametrize("kind", KINDS)
def test_loading_dequantises_to_ggufs_values_bit_for_bit(kind):
    # any bytes: scales that are normal, subnormal, infinite or NaN, every 4/8-bit value; the loader's
    # multi-threaded dequantisation must give gguf's NumPy result exactly (NaNs included, bit for bit)
    rng = np.random.default_rng(1)
    size = cpu_kernels.GGUF_KINDS[kind]
    blocks = rng.integers(0, 256, (70, 9 * size), dtype=np.uint8)
    blocks[0, 0:2] = [1, 0]  # the smallest subnormal scale
    want = quants.dequantize(blocks, getattr(Q, kind)).astype(np.float32)
    got = cpu_kernels.dequantize_gguf(kind, blocks)
    assert got.shape == want.shape == (70, 9 * 32) and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.isnan(want).any() and np.isfinite(want).mean() > 0.9  # noqa: PLR2004 - the bytes cover both
    with pytest.raises(ValueError, match=rf"{kind} blocks \(3, 7\)"):
        cpu_kernels.dequantize_gguf(kind, np.zeros((3, 7), np.uint8))


def test_bad_blocks_are_refused_with_the_shape():
    blocks = quants.quantize(np.ones((40, 64), np.float32), Q.Q4_1)
    with pytest.raises(ValueError, match=r"Q4_1 blocks \(40, 40\)"):
        cpu_kernels.pack_gguf("Q4_1", blocks)  # 40 rows: not a multiple of 32
    with pytest.raises(ValueError, match="Q6_K is not one of"):
        cpu_kernels.pack_gguf("Q6_K", blocks)
    wq = cpu_kernels.quant_weight(cpu_kernels.pack_gguf("Q8_0", quants.quantize(np.ones((32, 64), np.float32),
                                                                                 Q.Q8_0)))
    with pytest.raises(ValueError, match="QuantWeight"):
        cpu_kernels.small_matmul(jnp.ones((2, 32)), wq)  # K is 64


# llama: Q/K rows permuted in the file; every decode matrix in a kept type, the tied head Q8_0
ALL_KEPT = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "attn_output": Q.Q4_0,
            "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q8_0}
# qwen2: k in F16 (qkv keeps its float copy), the untied head Q5_0 (float copy too)
MIXED = {"attn_k": Q.F16, "attn": Q.Q4_1, "output.": Q.Q5_0, "ffn": Q.Q8_0, "*": Q.F16}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-blocks")
    return {"llama": write_gguf(root / "llama.gguf", "llama", ALL_KEPT),
            "qwen2": write_gguf(root / "qwen2.gguf", "qwen2", MIXED)}


def _step_logits(model, weights, steps: int = 3) -> np.ndarray:
    cache = init_layer_cache(model.cfg, 2, 32, heads_first=True)
    tokens, out = jnp.array([5, 17], jnp.int32), []
    step = jax.jit(lambda w, t, c: decode_step(w, model.cfg, t, c))
    for _ in range(steps):
        logits, cache = step(weights, tokens, cache)
        out.append(np.asarray(logits))
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    return np.stack(out)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_gguf_model_decodes_the_same_logits_from_its_blocks(files, family):
    model, _, _ = load_model_source(ModelSource(path=str(files[family])))
    from_blocks = decode_weights(model)
    taken = {n for n in ("qkv", "o", "gate_up", "down") if isinstance(from_blocks.layers[0][n], cpu_kernels.QuantWeight)}
    if family == "llama":
        assert taken == {"qkv", "o", "gate_up", "down"} and isinstance(from_blocks.head, cpu_kernels.QuantWeight)
        assert from_blocks.source_blocks == ("Q4_0", "Q4_1", "Q8_0")
    else:
        assert taken == {"o", "gate_up", "down"} and not isinstance(from_blocks.head, cpu_kernels.QuantWeight)
        assert from_blocks.layers[0]["qkv"].ndim == 3  # packed float copy
    assert "blocks" in decode_matmul_kind(from_blocks)
    set_decode_source(model, None)
    floats = decode_weights(model)
    assert floats.source_blocks == () and decode_matmul_kind(floats) == "cpu kernels"
    assert np.array_equal(_step_logits(model, from_blocks), _step_logits(model, floats))


def test_greedy_generation_from_the_blocks_matches_transformers(files):
    model, _, tokenizer = load_model_source(ModelSource(path=str(files["llama"])))
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)[0]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=sorted(tokenizer.stop_ids))
    engine = SamplingEngine(model, tokenizer, batch_size=2, max_len=64, chunk=8)
    assert engine.sampler.decode_weights.source_blocks
    got = next(iter(engine.generate([Request("p", prompt, params)]))).output_ids
    with torch.no_grad():
        want = transformers_model(files["llama"]).generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=sorted(tokenizer.stop_ids),
            pad_token_id=tokenizer.pad_id)[0, len(prompt):].tolist()
    assert got == want


def test_changed_parameters_drop_the_blocks(files):
    model, _, _ = load_model_source(ModelSource(path=str(files["llama"])))
    assert decode_weights(model).source_blocks
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda a: a * 1.5, state))  # e.g. a training step
    after = decode_weights(model)
    assert after.source_blocks == () and after.layers[0]["qkv"].ndim == 3
    np.testing.assert_allclose(np.asarray(cpu_kernels.unpack(after.layers[0]["down"])),
                               np.asarray(model.layers.mlp.down_proj.kernel[...][0]), rtol=0, atol=0)
