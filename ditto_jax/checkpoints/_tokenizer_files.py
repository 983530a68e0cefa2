"""Tokenizer files of a model folder: where they are, copying them verbatim, writing a tokenizer's own."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ditto_jax.checkpoints._layout import (
    CHECKPOINT_DIR,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    TOKENIZER_MODEL_FILES,
)
from ditto_jax.fileio import atomic_directory


class TokenizerFiles:
    """A tokenizer known only by its files; ``save(dir)`` copies them (no conversion, nothing lost)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]

    def save(self, out_dir: str | Path) -> Path:
        """Copy the tokenizer files into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for file in self.files:
            shutil.copy2(file, out / file.name)
        return out


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a tokenizer ``load_tokenizer`` can read (``tokenizer.json`` / ``.model``)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_MODEL_FILES)


def tokenizer_dir(path: str | Path) -> Path | None:
    """The folder holding a model's tokenizer files: ``tokenizer/`` of a model checkpoint or training workdir,
    the workdir's ``tokenizer/`` for one of its step folders, or an HF folder itself; None if there is none."""
    path = Path(path)
    cands = [path / TOKENIZER_DIR, path]
    if path.parent.name == CHECKPOINT_DIR:  # WORKDIR/checkpoints/<step>
        cands.append(path.parent.parent / TOKENIZER_DIR)
    return next((c for c in cands if c.is_dir() and has_tokenizer(c)), None)


def folder_tokenizer(path: str | Path) -> TokenizerFiles | None:
    """The tokenizer files of a model folder as a ``TokenizerFiles`` (None if it has none)."""
    folder = tokenizer_dir(path)
    return TokenizerFiles(folder) if folder is not None else None


def write_tokenizer_dir(tokenizer: Any, folder: str | Path, overwrite: bool = False) -> Path:
    """``tokenizer.save`` into ``folder`` atomically (a temporary sibling renamed when complete)."""
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        tokenizer.save(tmp)
    return Path(folder)
