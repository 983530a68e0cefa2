"""``ditto-jax convert from-hf HF_DIR CKPT_DIR`` and ``ditto-jax convert to-hf CKPT_DIR HF_DIR``.

from-hf: a Hugging Face folder -> a model checkpoint (``model.yaml`` + Orbax ``params/`` + ``tokenizer/``).
to-hf: a model checkpoint (or an HF folder) -> a Hugging Face folder (sharded safetensors + index).
Tokenizer files are copied verbatim in both directions.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


class TokenizerFiles:
    """A tokenizer known only by its files; ``save(dir)`` copies them (no conversion, nothing lost)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]

    def save(self, out_dir: str | Path) -> Path:
        """Copy the tokenizer files into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for file in self.files:
            shutil.copy2(file, out / file.name)
        return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert from-hf`` and ``convert to-hf``."""
    parser = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and Orbax")
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    p = sub.add_parser("from-hf", help="Hugging Face folder -> model checkpoint (model.yaml + Orbax params/)")
    p.add_argument("src", help="Hugging Face folder (config.json + safetensors)")
    p.add_argument("dst", help="model checkpoint folder to write")
    p.set_defaults(func=_guarded(_from_hf))
    q = sub.add_parser("to-hf", help="model checkpoint -> Hugging Face folder (sharded safetensors)")
    q.add_argument("src", help="model checkpoint folder (or a Hugging Face folder)")
    q.add_argument("dst", help="Hugging Face folder to write")
    q.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    q.set_defaults(func=_guarded(_to_hf))
    for x in (p, q):
        x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="parameter dtype (default: keep the source's)")
        x.add_argument("--overwrite", action="store_true", help="replace an existing destination")


def _guarded(fn):
    """Bad input (missing path, malformed checkpoint, existing destination) -> one error line, exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _tokenizer(src: Path) -> TokenizerFiles | None:
    from ditto_jax.model.checkpoint import tokenizer_dir

    folder = tokenizer_dir(src)
    return TokenizerFiles(folder) if folder is not None else None


def _from_hf(args: argparse.Namespace) -> int:
    from ditto_jax import hf
    from ditto_jax.model.checkpoint import save_model_checkpoint

    start = time.perf_counter()
    model, cfg = hf.load_pretrained(args.src, dtype=args.dtype)
    save_model_checkpoint(model, cfg, args.dst, tokenizer=_tokenizer(Path(args.src)), overwrite=args.overwrite)
    print(f"wrote {args.dst}: {cfg.architecture}, {cfg.num_params():,} parameters, {cfg.param_dtype} "
          f"({time.perf_counter() - start:.1f}s)")
    return 0


def _to_hf(args: argparse.Namespace) -> int:
    from ditto_jax import hf
    from ditto_jax.model.checkpoint import load_model

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    start = time.perf_counter()
    model, cfg = load_model(args.src, dtype=args.dtype)
    hf.save_pretrained(model, cfg, dst, tokenizer=_tokenizer(Path(args.src)), max_shard_size=args.max_shard_size)
    print(f"wrote {dst}: {cfg.architecture}, {cfg.num_params():,} parameters, {cfg.param_dtype} "
          f"({time.perf_counter() - start:.1f}s)")
    return 0
