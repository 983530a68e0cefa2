"""Export: transformers loads what we write (identical tensors and logits); HF -> ours -> HF is bit-identical."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import FAMILIES, forward, hf_logits, hf_state, make_hf_model, save_hf, token_batch

from ditto_jax import hf
from ditto_jax.model import create_model, load_model_config


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_identical_and_loads_in_transformers(family, tmp_path):
    original = make_hf_model(family)
    src = save_hf(original, tmp_path / "src")
    model, cfg = hf.load_pretrained(src)
    out = hf.save_pretrained(model, cfg, tmp_path / "out")
    before, after = hf_state(src), hf_state(out)
    assert sorted(before) == sorted(after)
    for name in before:
        assert after[name].dtype == before[name].dtype and np.array_equal(after[name], before[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(original)
    want = original.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    ids = token_batch()
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(original, ids))
    for key in ("rope_parameters", "tie_word_embeddings", "num_key_value_heads", "head_dim", "sliding_window"):
        assert getattr(reloaded.config, key, None) == getattr(original.config, key, None), key


def test_bf16_round_trip_and_sharded_export_with_tokenizer(tmp_path):
    src = save_hf(make_hf_model("llama"), tmp_path / "src", dtype=torch.bfloat16)
    model, cfg = hf.load_pretrained(src)

    class FakeTokenizerFiles:  # the export contract: an object with save(dir)
        def save(self, folder):
            (folder / "tokenizer.json").write_text("{}")

    out = hf.save_pretrained(model, cfg, tmp_path / "out", tokenizer=FakeTokenizerFiles(), max_shard_size="10KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in hf_state(out).values())
    assert (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    before, after = hf_state(src), hf_state(out)
    assert all(after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]) for k in before)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    # dtype= casts on export
    out32 = hf.save_pretrained(model, cfg, tmp_path / "out32", dtype="float32")
    assert all(v.dtype == np.float32 for v in hf_state(out32).values())


def test_export_of_a_native_model_matches_transformers_logits(tmp_path):
    cfg = load_model_config("model/tiny")
    model = create_model(cfg, seed=3)
    out = hf.save_pretrained(model, cfg, tmp_path / "tiny")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = token_batch() % cfg.vocab_size
    np.testing.assert_allclose(forward(model, ids), hf_logits(reloaded, ids), atol=1e-4, rtol=0)
