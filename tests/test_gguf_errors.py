"""Bad GGUF files: an unsupported architecture, tensor type or tensor, a truncated file, a GGUF without tokenizer
metadata -- each a one-line ``error:`` from the CLI naming the file (and tensor/type/field), nothing written."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import write_gguf

from ditto_jax.checkpoints import (
    CheckpointError,
    ModelSource,
    _gguf,
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


@pytest.mark.parametrize("endian", ["little", "big"])
def test_the_fast_metadata_reader_gives_gguf_readers_fields(tmp_path, endian):
    # ``_gguf._Reader`` replaces three of GGUFReader's parsing helpers for speed; every field, part and tensor
    # must come out as the reader's own (values, dtypes and byte order)
    path = tmp_path / f"{endian}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=getattr(gguf.GGUFEndian, endian.upper()))
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.rope.freq_base", 1e4)
    writer.add_string("general.name", "naïve ✓")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bé", "", "<s>"] * 50)
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0] * 3)
    writer.add_array("tokenizer.ggml.token_type", [1, 3, 6] * 7)
    writer.add_tensor("t", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    want, got = gguf.GGUFReader(str(path)), _gguf._Reader(str(path))
    assert list(got.fields) == list(want.fields)
    for name, field in want.fields.items():
        mine = got.fields[name]
        assert (mine.offset, mine.data, mine.types) == (field.offset, field.data, field.types), name
        assert len(mine.parts) == len(field.parts), name
        for a, b in zip(mine.parts, field.parts):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert mine.contents() == field.contents(), name
    assert got.fields["tokenizer.ggml.tokens"].contents()[:4] == ["a", "bé", "", "<s>"]
    assert [(t.name, t.tensor_type, list(t.shape)) for t in got.tensors] == \
        [(t.name, t.tensor_type, list(t.shape)) for t in want.tensors]
    assert np.array_equal(got.tensors[0].data, want.tensors[0].data)
    # a file cut inside the arrays is an error naming it, wherever the cut falls
    data = path.read_bytes()
    first, last = got.fields["tokenizer.ggml.tokens"].offset, got.fields["tokenizer.ggml.token_type"].offset
    for cut in range(first + 1, last + 12, 37):
        bad = tmp_path / f"cut-{endian}-{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as err:
            _gguf._open(bad)
        assert str(bad) in str(err.value)
