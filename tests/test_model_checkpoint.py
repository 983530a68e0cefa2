"""Model checkpoints (model.yaml + Orbax params + tokenizer) and ``ditto-jax convert`` in both directions."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import hf_state, make_hf_model, save_hf

from ditto_jax import hf
from ditto_jax.checkpoints import is_model_checkpoint, load_model, save_model_checkpoint, tokenizer_dir
from ditto_jax.cli import main
from ditto_jax.mesh import MeshConfig, make_mesh


def _params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = save_hf(make_hf_model("llama"), tmp_path_factory.mktemp("ckpt") / "hf")
    (path / "tokenizer.json").write_text('{"model": "stand-in"}')
    (path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return path


def test_checkpoint_round_trip_dtype_and_mesh(hf_dir, tmp_path):
    model, cfg = load_model(hf_dir)  # the HF branch of the dispatch
    ckpt = save_model_checkpoint(model, cfg, tmp_path / "ckpt")
    assert is_model_checkpoint(ckpt) and not is_model_checkpoint(hf_dir)
    restored, cfg2 = load_model(ckpt)
    assert cfg2 == cfg
    want = _params(model)
    got = _params(restored)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    half, cfg_half = load_model(ckpt, dtype="bfloat16")
    assert cfg_half.param_dtype == "bfloat16" and half.layers.mlp.up_proj.kernel[...].dtype == jax.numpy.bfloat16
    if jax.device_count() >= 8:
        mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        sharded, _ = load_model(ckpt, mesh=mesh)
        kernel = sharded.layers.mlp.up_proj.kernel[...]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        assert np.array_equal(np.asarray(kernel), want["layers.mlp.up_proj.kernel"])
    with pytest.raises(FileExistsError, match="already exists"):
        save_model_checkpoint(model, cfg, ckpt)
    save_model_checkpoint(half, cfg_half, ckpt, overwrite=True)
    assert load_model(ckpt)[1].param_dtype == "bfloat16"


def test_convert_cli_round_trip_is_bit_identical(hf_dir, tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["convert", "from-hf", str(hf_dir), str(ckpt)]) == 0
    assert tokenizer_dir(ckpt) == ckpt / "tokenizer"
    assert main(["convert", "to-hf", str(ckpt), str(out), "--max-shard-size", "20KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    before, after = hf_state(hf_dir), hf_state(out)
    assert sorted(before) == sorted(after)
    assert all(after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]) for k in before)
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()
    assert (out / "tokenizer_config.json").exists()
    # Bad input: one error line, exit code 1, nothing written.
    assert main(["convert", "to-hf", str(ckpt), str(out)]) == 1
    assert main(["convert", "from-hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "missing" in err and not (tmp_path / "x").exists()
    assert main(["convert", "to-hf", str(ckpt), str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert {v.dtype.name for v in hf_state(out).values()} == {"bfloat16"}
    assert hf.load_pretrained(out)[1].param_dtype == "bfloat16"
