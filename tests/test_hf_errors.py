"""Bad input gives one clear error naming the file, tensor or field; outputs are never half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hf_fixtures import make_hf_model, save_hf
from safetensors.numpy import load_file, save_file

from ditto_jax import hf
from ditto_jax.checkpoints import load_model, save_model_checkpoint
from ditto_jax.hf import HFCheckpointError
from ditto_jax.model import create_model, load_model_config


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save_hf(make_hf_model("qwen2"), tmp_path_factory.mktemp("good") / "qwen2")


@pytest.fixture
def bad(good, tmp_path) -> Path:
    """A fresh copy of the good checkpoint to break."""
    return Path(shutil.copytree(good, tmp_path / "bad"))


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, fn) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        hf.load_pretrained(tmp_path / "nothere")
    with pytest.raises(HFCheckpointError, match="no config.json"):
        hf.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a model"):
        load_model(tmp_path)


def test_unknown_architecture(bad):
    _edit_config(bad, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(HFCheckpointError, match=r"config\.json.*GPT2LMHeadModel.*'architectures'"):
        hf.load_pretrained(bad)


@pytest.mark.parametrize("changes, field", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'.*rope_scaling"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "'dynamic'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 8}, "layer_types"),
    ({"layer_types": None, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "max_window"),
    ({"dtype": "int8"}, "'dtype'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_unsupported_config_fields(bad, changes, field):
    _edit_config(bad, **changes)
    with pytest.raises(HFCheckpointError, match=field):
        hf.load_pretrained(bad)


def test_invalid_config_json(bad):
    (bad / "config.json").write_text("{not json")
    with pytest.raises(HFCheckpointError, match=r"config\.json: invalid JSON"):
        hf.load_pretrained(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"),
     r"missing tensor.*model\.layers\.1\.self_attn\.k_proj\.bias"),
    (lambda t: t.update({"model.layers.7.mlp.gate_proj.weight": np.zeros((64, 32), np.float32)}),
     r"unexpected tensor.*model\.layers\.7\.mlp\.gate_proj\.weight"),
    (lambda t: t.update({"model.norm.weight": np.ones((32,), np.int8)}),
     r"model\.safetensors: tensor 'model\.norm\.weight' has dtype I8"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((60, 32), np.float32)}),
     r"model\.safetensors.*up_proj\.weight.*\[60, 32\].*\[64, 32\]"),
], ids=["missing", "extra", "int8", "shape"])
def test_bad_tensors(bad, edit, message):
    _edit_tensors(bad, edit)
    with pytest.raises(HFCheckpointError, match=message):
        hf.load_pretrained(bad)


def test_truncated_and_corrupt_safetensors(bad):
    file = bad / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        hf.load_pretrained(bad)
    file.write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        hf.load_pretrained(bad)


def test_index_naming_a_missing_shard_and_pickle_only_folders(bad):
    names = list(load_file(str(bad / "model.safetensors")))
    index = {"metadata": {}, "weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors\.index\.json.*model-00002-of-00002"):
        hf.load_pretrained(bad)
    (bad / "model.safetensors.index.json").unlink()
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError, match="only safetensors"):
        hf.load_pretrained(bad)


class _FailingTokenizer:
    def save(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "tokenizer.json").write_text("{")
        raise RuntimeError("disk full")


def test_outputs_are_never_half_written(tmp_path):
    cfg = load_model_config("model/tiny")
    model = create_model(cfg)
    for save in (lambda p: hf.save_pretrained(model, cfg, p, tokenizer=_FailingTokenizer()),
                 lambda p: save_model_checkpoint(model, cfg, p, tokenizer=_FailingTokenizer())):
        target = tmp_path / "out"
        with pytest.raises(RuntimeError, match="disk full"):
            save(target)
        assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary sibling remains
    # An existing folder that is not an export of ours is never replaced.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(HFCheckpointError, match="not a Hugging Face export"):
        hf.save_pretrained(model, cfg, precious)
    with pytest.raises(FileExistsError, match="already exists"):
        save_model_checkpoint(model, cfg, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
