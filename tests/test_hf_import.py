"""Import parity against transformers: every family, bf16/fp16 checkpoints, sharded index files, packed rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import FAMILIES, forward, hf_logits, hf_state, make_hf_model, save_hf, token_batch

from ditto_jax import hf

FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (HF model, folder) for the fp32 reference checkpoints."""
    root = tmp_path_factory.mktemp("hf_import")
    out = {}
    for family in FAMILY_NAMES:
        model = make_hf_model(family)
        out[family] = (model, save_hf(model, root / family))
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_import_logits_match_transformers(saved, family):
    hf_model, path = saved[family]
    model, cfg = hf.load_pretrained(path)
    assert cfg.architecture == family and cfg.param_dtype == "float32"
    ids = token_batch()
    ours = forward(model, ids)
    ref = hf_logits(hf_model, ids)
    assert ours.shape == ref.shape == (3, 12, 128)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_config_translation_covers_family_features(saved):
    cfgs = {f: hf.load_pretrained(saved[f][1])[1] for f in ("llama", "qwen2", "qwen3", "mistral")}
    llama = cfgs["llama"]
    assert llama.tie_word_embeddings and llama.rope_scaling.rope_type == "llama3" and llama.rope_theta == 500000.0
    assert llama.rope_scaling.original_max_position_embeddings == 16 and llama.eos_ids == [2]
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].tie_word_embeddings and cfgs["qwen2"].rope_theta == 1e6
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].dim_per_head == 16 != 32 // 4
    assert cfgs["mistral"].num_kv_heads == 1 and cfgs["mistral"].sliding_window == 5
    # The sliding window matters on these sequences: without it transformers' own logits change.
    hf_model, _ = saved["mistral"]
    no_window = make_hf_model("mistral", sliding_window=None)
    assert np.abs(hf_logits(hf_model, token_batch()) - hf_logits(no_window, token_batch())).max() > 1e-3


def test_import_bf16_and_fp16_checkpoints(saved, tmp_path):
    hf_model, _ = saved["qwen2"]
    for torch_dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        path = save_hf(make_hf_model("qwen2"), tmp_path / name, dtype=torch_dtype)
        model, cfg = hf.load_pretrained(path)
        assert cfg.param_dtype == name and cfg.dtype == name
        stored = hf_state(path)["model.layers.1.self_attn.q_proj.weight"]
        ours = np.asarray(model.layers.self_attn.q_proj.kernel[...])[1]
        assert ours.dtype == stored.dtype and np.array_equal(ours.T, stored)  # bit-exact, no round trip via fp32
    # dtype= overrides: the bf16 weights in float32 give transformers' logits of the same (bf16-rounded) weights.
    model, cfg = hf.load_pretrained(tmp_path / "bfloat16", dtype="float32")
    assert cfg.param_dtype == "float32" and model.embed_tokens[...].dtype == np.float32
    rounded = make_hf_model("qwen2").to(torch.bfloat16).float()
    np.testing.assert_allclose(forward(model, token_batch()), hf_logits(rounded, token_batch()), atol=1e-4, rtol=0)


def test_import_sharded_index(saved, tmp_path):
    hf_model, _ = saved["qwen3"]
    path = save_hf(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (path / "model.safetensors").exists()
    model, _ = hf.load_pretrained(path)
    np.testing.assert_allclose(forward(model, token_batch()), hf_logits(hf_model, token_batch()), atol=1e-4, rtol=0)


def test_packed_segments_and_positions_match_separate_sequences(saved):
    """Two sequences packed in one row (segment ids, positions restarting) give each one's own logits."""
    hf_model, path = saved["llama"]
    model, _ = hf.load_pretrained(path)
    a, b = token_batch(1, 7, seed=1)[0], token_batch(1, 5, seed=2)[0]
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 7 + [2] * 5], np.int32)
    positions = np.array([list(range(7)) + list(range(5))], np.int32)
    run = nnx.jit(lambda m, ids, pos, seg: m(ids, positions=pos, segment_ids=seg))
    out = np.asarray(run(model, packed, positions, segments))[0]
    np.testing.assert_allclose(out[:7], hf_logits(hf_model, a[None])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[7:], hf_logits(hf_model, b[None])[0], atol=1e-4, rtol=0)
    # Other relative positions change the logits (RoPE is applied), so the test above is not vacuous.
    shifted = np.asarray(run(model, packed, positions * 2, segments))[0]
    assert np.abs(shifted[1:7] - out[1:7]).max() > 1e-4


def test_import_streams_tensors_instead_of_materialising_the_model(tmp_path):
    """Host (numpy) memory during a load peaks near a layer's tensors, far below the model size."""
    import tracemalloc

    hf_model = make_hf_model("qwen2", hidden_size=128, intermediate_size=1024, num_hidden_layers=8)
    path = save_hf(hf_model, tmp_path / "wide")
    model_bytes = sum(p.numel() * 4 for p in hf_model.parameters())
    hf.load_pretrained(path)  # imports and compilations first: they are not what is measured
    tracemalloc.start()
    try:
        model, _ = hf.load_pretrained(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.asarray(model.layers.mlp.down_proj.kernel[...])[7],
                          hf_model.model.layers[7].mlp.down_proj.weight.detach().numpy().T)
    # At most a few layers are on the host at once (the device copy of layer i may still be in flight while
    # layer i+1 is read): far below the model, which a non-streaming load would hold whole.
    layer_bytes = sum(p.numel() * 4 for p in hf_model.model.layers[0].parameters())
    assert peak < 3 * layer_bytes and peak < model_bytes / 3, (peak, layer_bytes, model_bytes)


def test_tied_checkpoint_with_a_stored_lm_head_is_loaded_and_the_skip_reported(saved, tmp_path, caplog):
    import shutil

    from safetensors.numpy import load_file, save_file

    hf_model, src = saved["llama"]
    path = Path(shutil.copytree(src, tmp_path / "tied"))
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        model, cfg = hf.load_pretrained(path)
    assert cfg.tie_word_embeddings and model.lm_head is None
    assert "skipped 1 non-parameter tensor(s) (lm_head.weight)" in caplog.text
