"""Bad GGUF files: an unsupported architecture, tensor type or tensor, a truncated file, a GGUF without tokenizer
metadata -- each a one-line ``error:`` from the CLI naming the file (and tensor/type/field), nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import write_gguf

from ditto_jax.checkpoints import (
    CheckpointError,
    ModelSource,
    load_model,
    source_tokenizer,
)
from ditto_jax.cli import main


def _convert_fails(capsys, src, dst) -> str:
    assert main(["convert", "from-gguf", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}*")), "something half-written"
    return err


def test_unsupported_architecture_names_the_field_and_file(tmp_path, capsys):
    src = write_gguf(tmp_path / "phi.gguf", "llama", arch_override="phi2")
    err = _convert_fails(capsys, src, tmp_path / "out")
    assert str(src) in err and "'phi2'" in err and "general.architecture" in err


def test_unsupported_tensor_type_names_tensor_type_and_file(tmp_path, capsys):
    src = write_gguf(tmp_path / "f64.gguf", "qwen2", {"*": Q.Q8_0},
                     extra_tensors={"blk.0.odd_scale.weight": np.ones(64, np.float64)})
    err = _convert_fails(capsys, src, tmp_path / "out")
    assert str(src) in err and "'blk.0.odd_scale.weight'" in err and "F64" in err


def test_tensor_the_model_does_not_use_is_named(tmp_path, capsys):
    src = write_gguf(tmp_path / "bias.gguf", "llama", extra_tensors={"blk.1.attn_q.bias": np.ones(64, np.float32)})
    err = _convert_fails(capsys, src, tmp_path / "out")
    assert str(src) in err and "'blk.1.attn_q.bias' (F32)" in err and "does not use" in err
    src = write_gguf(tmp_path / "rope.gguf", "llama", extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    err = _convert_fails(capsys, src, tmp_path / "out")
    assert str(src) in err and "'rope_freqs.weight'" in err and "rope scaling" in err


def test_truncated_file_is_one_line(tmp_path, capsys):
    good = write_gguf(tmp_path / "good.gguf", "qwen3", {"*": Q.Q4_0})
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    err = _convert_fails(capsys, bad, tmp_path / "out")
    assert str(bad) in err
    with pytest.raises(CheckpointError):
        load_model(bad)


def test_gguf_without_tokenizer_metadata_has_no_tokenizer(tmp_path):
    src = write_gguf(tmp_path / "notok.gguf", "qwen2", with_tokenizer=False)
    _, cfg = load_model(src)
    assert cfg.vocab_size == 320  # from token_embd, not the missing token list
    assert source_tokenizer(ModelSource(path=str(src))) is None
    with pytest.raises(CheckpointError, match="no tokenizer"):
        source_tokenizer(ModelSource(path=str(src)), required=True)
